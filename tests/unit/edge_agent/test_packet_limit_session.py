"""``edge_agent.packet_limit`` through the session's paho callbacks, called as paho's network
thread and the session's loop call them (no broker: the wire is the test's): the suspect held
back from the resend, a verdict and what it takes out of paho's queue, the takeovers counted.
The same through Mosquitto: tests/integration/test_agent_packet_limit*.py.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import AgentConfig
from edge_agent.packet_evidence import CLOSES
from edge_agent.reconnect import CONNECTION_LOST
from edge_agent.session import Session


def _session(tmp_path: Path) -> Session:
    """A session never started: paho's callbacks are called as its network thread would."""
    config = AgentConfig(
        device="dev-p", broker="mqtt://127.0.0.1:1", data_dir=tmp_path,
        trust=[tmp_path / "unused.pub"], protocol="3.1.1", prefix="t",
    )  # fmt: skip
    return Session(config, will=("t/dev-p/status", {}), on_message=lambda _m: None)


def _connect(session: Session) -> None:
    """A connect, as ``Session._connect_once`` and paho's loop make it."""
    with session.client._out_message_mutex:  # paho's reconnect(): all is to be sent again
        for m in session.client._out_messages.values():
            m.state = mqtt.mqtt_ms_publish
    session.limit.hold_back()  # before the CONNACK is read
    session._handle_connect(
        session.client, None, mqtt.ConnectFlags(session_present=True),
        ReasonCode(PacketTypes.CONNACK, identifier=0), Properties(PacketTypes.CONNACK),
    )  # fmt: skip
    with session.client._out_message_mutex:  # sent again at the CONNACK, as paho does
        for m in session.client._out_messages.values():
            if m.state == mqtt.mqtt_ms_publish:
                m.timestamp, m.state = time.monotonic(), mqtt.mqtt_ms_wait_for_puback
                session.client._send_publish(
                    m.mid, m.topic.encode(), m.payload, m.qos, m.retain, m.dup
                )  # on the wire if the test gave paho one


def _held(session: Session) -> set[int]:
    """The mids paho holds that it did not send again at the CONNACK."""
    with session.client._out_message_mutex:
        return {m.mid for m in session.client._out_messages.values() if m.state == 0}


def _release(session: Session) -> None:
    """The connection held SOON_S and carried data (a PUBACK or the PINGRESP to the session's
    PINGREQ came): what waited goes (the session's loop calls this)."""
    session.limit._carried = True
    session.limit.release(session.limit.watch.quiet_until)


def test_what_waits_goes_only_once_the_link_carried_a_round_trip(tmp_path: Path) -> None:
    """A link that passes the CONNECT and its CONNACK, then nothing, and drops at a fixed age
    after the quiet (1.05 to 2.05 s): the old session sent the held answer once the quiet was
    over, the drop came right after, twice, and the broker took 12 KB answers it takes for over
    its limit. Now, past the quiet, it sends a PINGREQ and waits for its PINGRESP (or any
    PUBACK) before it sends what waits."""
    session = _session(tmp_path)
    wire = _wire(session)
    _connect(session)
    answer = session.publish("t/replies/answer", b"a" * 12_000)
    _close(session)  # the answer in flight: the suspect
    _published(wire)
    _connect(session)
    quiet = session.limit.watch.quiet_until
    session.limit.release(quiet)  # the quiet is over: a PINGREQ, nothing else
    session.limit.release(quiet + 0.5)  # no PINGRESP yet
    assert _published(wire) == [] and answer.mid in _held(session)
    session.client._ping_t = 0  # paho's handler of the PINGRESP
    session.limit.release(quiet + 0.6)
    assert [topic for topic, _ in _published(wire)] == ["t/replies/answer"]


def _close(session: Session) -> None:
    """The socket closed, no DISCONNECT: what a broker over its limit and a link drop both do."""
    session._handle_disconnect(
        session.client, None, mqtt.DisconnectFlags(is_disconnect_packet_from_server=False),
        ReasonCode(PacketTypes.DISCONNECT, identifier=CONNECTION_LOST), None,
    )  # fmt: skip
    session.limit.drop_refused()


def _puback(session: Session, mid: int) -> None:
    with session.client._out_message_mutex:
        session.client._do_on_publish(mid, ReasonCode(PacketTypes.PUBACK), None)  # type: ignore[arg-type]


def test_a_takeover_is_told_while_each_close_finds_a_larger_answer_in_flight(
    tmp_path: Path,
) -> None:
    """Another client with our client id closes our connection soon after each reconnect, while
    the agent answers, each answer larger than the last: each close has a new suspect, which is
    no verdict, so the drops are the takeover's (the old code called every one explained)."""
    session = _session(tmp_path)
    for n in range(4):
        _connect(session)
        with session.client._out_message_mutex:
            for mid in list(session.client._out_messages):
                _puback(session, mid)  # the last answer got through this time
        session.publish(f"t/replies/{n}", b"r" * (2000 + 1000 * n))
        _connect_sent(session)
        _close(session)
    assert session.takeover.taken_over >= 2
    assert session.limit.bound is None and session.limit.refused == 0


def _connect_sent(session: Session) -> None:
    with session.client._out_message_mutex:  # what it published is on the wire
        for m in session.client._out_messages.values():
            m.state = mqtt.mqtt_ms_wait_for_puback


def test_a_mid_used_again_after_its_message_was_acknowledged_is_a_new_message(
    tmp_path: Path,
) -> None:
    """paho's mids wrap after 65535 publishes: the suspect of one close, acknowledged since,
    says nothing of a new message given its mid (the old code counted it the second close)."""
    session = _session(tmp_path)
    _connect(session)
    first = session.publish("t/replies/a", b"a" * 3000)
    _connect_sent(session)
    _close(session)  # a link drop while it was on its way: the suspect
    _connect(session)
    _puback(session, first.mid)  # the broker took it after the reconnect
    session.client._last_mid = first.mid - 1  # 65535 publishes later
    second = session.publish("t/replies/b", b"b" * 6000)
    assert second.mid == first.mid
    _connect_sent(session)
    _close(session)  # one drop while it is on its way
    assert session.limit.bound is None and session.limit.refused == 0
    assert second.mid in session.client._out_messages  # not taken out: sent again


def _row(session: Session, payload: bytes, told: list[str]) -> mqtt.MQTTMessageInfo:
    """A message the broker closes the connection for each time it reads it: sent, then held
    back and sent again once each reconnect held SOON_S, CLOSES times."""
    info = session.publish("t/replies/big", payload, on_too_large=told.append)
    _connect_sent(session)
    _close(session)
    for _ in range(CLOSES - 1):
        _connect(session)
        assert info.mid in _held(session)  # not sent again at the CONNACK
        _release(session)
        assert info.mid not in _held(session)
        _close(session)
    return info


def test_a_link_that_drops_before_the_held_back_suspect_goes_teaches_nothing(
    tmp_path: Path,
) -> None:
    """The review's flaky link: each connection dropped within SOON_S of its CONNACK, while a
    12 KB answer waits. The old session sent it again at each CONNACK, and three such drops
    made a verdict: the answer, which the broker takes, was refused as too large. Held back,
    the answer is never on the wire when such a drop comes: the row ends there."""
    session, told = _session(tmp_path), []
    _connect(session)
    info = session.publish("t/replies/answer", b"a" * 12_000, on_too_large=told.append)
    _connect_sent(session)
    _close(session)  # the first drop, right after it was sent: the suspect
    for _ in range(2 * CLOSES):
        _connect(session)
        _close(session)  # within SOON_S of the reconnect: it waited, unsent (or was the first)
    assert session.limit.bound is None and session.limit.refused == 0 and told == []
    _connect(session)  # the link holds now
    _release(session)
    _puback(session, info.mid)  # the broker took it
    assert info.mid not in session.client._out_messages and session.limit.bound is None


def test_the_takeovers_a_verdicts_row_would_count_are_never_counted(tmp_path: Path) -> None:
    """A link cut (or a broker restarted) just before an answer over the limit is sent: that drop
    and the answer's first close are two unexplained drops in a row soon after a reconnect, which
    the takeover watch takes for two takeovers. The verdict explains the row. The code before
    kept them (the retained status and the metric said another client took the id); the code
    after it counted them and took them back at the verdict, so the counter
    edgebento_agent_session_taken_over_total went 2, then 0 (a Prometheus counter going down
    reads as a reset). They wait for the row's end, and are dropped: never counted."""
    session, told = _session(tmp_path), []
    _connect(session)
    _close(session)  # nothing in flight: any other drop
    _connect(session)
    info = session.publish("t/replies/big", b"r" * 20_000, on_too_large=told.append)
    _connect_sent(session)
    _close(session)  # the row's first close: a takeover, or the answer
    counts = [session.takeover.taken_over]
    for _ in range(CLOSES - 1):
        _connect(session)
        _release(session)
        _close(session)
        counts.append(session.takeover.taken_over)
    assert info.mid not in session.client._out_messages and len(told) == 1
    assert counts == [0] * CLOSES


def test_a_row_that_ends_with_no_verdict_counts_its_takeovers(tmp_path: Path) -> None:
    """The same two drops, then one before the held-back answer goes (the link's, or another
    client's): the row ends with no verdict, and what its first close counted is counted."""
    session, told = _session(tmp_path), []
    _connect(session)
    _close(session)
    _connect(session)
    session.publish("t/replies/big", b"r" * 20_000, on_too_large=told.append)
    _connect_sent(session)
    _close(session)
    _connect(session)
    _close(session)  # before the release: the answer unsent, the row ends
    assert session.takeover.taken_over == 3 and told == []


def test_a_message_taken_out_over_the_limit_completes_as_failed(tmp_path: Path) -> None:
    """Its MQTTMessageInfo never completed: wait_for_publish(None) waited for ever (here: for the
    whole timeout, returning as if still on its way), is_published() said False for ever."""
    session, told = _session(tmp_path), []
    _connect(session)
    info = _row(session, b"r" * 20_000, told)
    assert info.mid not in session.client._out_messages and len(told) == 1
    assert info.rc == mqtt.MQTT_ERR_PAYLOAD_SIZE
    with pytest.raises(RuntimeError, match="too large"):
        info.wait_for_publish(timeout=30)
    with pytest.raises(RuntimeError):
        info.is_published()


def test_a_message_as_large_published_while_the_suspect_waits_waits_too(tmp_path: Path) -> None:
    """Telemetry publishes its batch again at each reconnect. Sent during the quiet, each new
    copy was the suspect of the next drop, the row never reached a verdict and the broker
    dropped the device for ever (found through Mosquitto by test_agent_packet_limit.py's batch
    test). It waits with the suspect, which goes first."""
    session, told = _session(tmp_path), []
    _connect(session)
    first = session.publish("t/telemetry", b"b" * 42_000, on_too_large=told.append)
    _connect_sent(session)
    _close(session)
    for _ in range(CLOSES - 1):
        _connect(session)
        again = session.publish("t/telemetry", b"b" * 42_000, on_too_large=told.append)
        assert {first.mid, again.mid} <= _held(session)  # neither on the wire in the quiet
        _release(session)
        assert not _held(session)
        _close(session)
    assert session.limit.bound == 42_023 and len(told) == CLOSES  # each copy taken out


def _wire(session: Session) -> socket.socket:
    """A socket for paho to write to, as if connected: the other end reads what it sent."""
    ours, theirs = socket.socketpair()
    session.client._sock = ours
    theirs.setblocking(False)
    return theirs


def _published(wire: socket.socket) -> list[tuple[str, bytes]]:
    """The PUBLISH packets (MQTT 3.1.1, QoS 1) paho wrote since the last call."""
    data = b""
    while True:
        try:
            chunk = wire.recv(1 << 16)
        except BlockingIOError:
            break
        if not chunk:  # paho closed its end: the session stopped
            break
        data += chunk
    packets, at = [], 0
    while at < len(data):
        kind, length, shift, at = data[at] >> 4, 0, 0, at + 1
        while True:  # the remaining length: 7 bits a byte, low first
            length, shift, at = length | (data[at] & 0x7F) << shift, shift + 7, at + 1
            if data[at - 1] < 0x80:
                break
        body, at = data[at : at + length], at + length
        if kind == 3:
            topic_end = 2 + int.from_bytes(body[:2], "big")
            packets.append((body[2:topic_end].decode(), body[topic_end + 2 :]))
    return packets


_MESSAGES = st.lists(
    st.tuples(st.sampled_from("abc"), st.sampled_from([200, 3000, 9000]), st.booleans()),
    min_size=1,
    max_size=10,
)


@settings(max_examples=60, deadline=None)
@given(_MESSAGES)
def test_what_waits_out_the_quiet_keeps_each_topics_order(
    messages: list[tuple[str, int, bool]],
) -> None:
    """Messages published before a close (each on the wire, none acknowledged) and in the quiet
    of the next connection, some as large as a suspect: the old session sent the held ones
    after the rest, the suspect first, so a later small message (or another as large) on the
    same topic overtook an earlier one (a pipeline's actions topic got its decisions [B, A, A]).
    Each topic's messages now go in the order they were published."""
    session = _session(Path(tempfile.mkdtemp()))
    wire = _wire(session)
    _connect(session)
    messages.sort(key=lambda m: not m[2])  # numbered in the order published: before, then in
    for n, (topic, size, before) in enumerate(messages):
        if before:  # published and sent on the first connection
            session.publish(f"t/{topic}", n.to_bytes(2, "big") + b"m" * size)
    _close(session)  # with them in flight: a large one among them is the suspect
    _published(wire)  # what the first connection carried is lost with it
    _connect(session)
    for n, (topic, size, before) in enumerate(messages):
        if not before:  # published in the quiet
            session.publish(f"t/{topic}", n.to_bytes(2, "big") + b"m" * size)
    _release(session)
    sent = _published(wire)
    assert sorted(int.from_bytes(p[:2], "big") for _, p in sent) == list(range(len(messages)))
    for topic in "abc":
        order = [int.from_bytes(p[:2], "big") for t, p in sent if t == f"t/{topic}"]
        assert order == sorted(order), (topic, order)


def test_a_stop_in_the_quiet_sends_what_waits_after_the_last_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply on its way when the link dropped waits out the quiet of the next connection, and
    the agent is stopped meanwhile (a SIGTERM). The old session published its last words and
    disconnected: the reply was never sent, and nothing said so. Now it goes after the last
    words, and an older status waiting on their topic does not (it would replace them)."""
    session = _session(tmp_path)
    wire = _wire(session)
    _connect(session)
    session.publish("t/dev-p/status", b"online" + b"s" * 2000, retain=True)
    reply = session.publish("t/replies/r", b"r" * 12_000)
    _close(session)  # the reply is the suspect; the status waits with it
    _published(wire)
    _connect(session)
    assert {reply.mid} < _held(session) and session.limit.holding
    session.stop(("t/dev-p/status", b"offline"))  # nothing acknowledges: the budget runs out
    sent = [(topic, payload[:7]) for topic, payload in _published(wire)]
    assert sent == [("t/dev-p/status", b"offline"), ("t/replies/r", b"r" * 7)]
    assert "1 older than the status just sent on its topic" in caplog.text
