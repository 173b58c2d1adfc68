"""``edge_agent.last_will``: the will is bounded, says what it lacks, parses as a ``Status``, and
its CONNECT (as paho encodes it) fits the room it was cut for. Through Mosquitto and a real
agent killed -9: tests/integration/test_agent_last_will.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.protocol import Status
from edge_agent.config import AgentConfig
from edge_agent.last_will import BARE, ESSENTIAL, WILL_BYTES, LastWill, bounded, connect_bytes
from edge_agent.mqtt_client import connect, make_client

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)
NAME = st.from_regex(r"[a-z][a-z0-9-]{0,40}", fullmatch=True)
MODEL = st.fixed_dictionaries({"name": NAME, "version": st.integers(0, 10**6)})


@st.composite
def statuses(draw: st.DrawFn) -> dict[str, Any]:
    """An offline status as the agent dumps it (``Status.model_dump(mode="json")``)."""
    doc: dict[str, Any] = {
        "schema_version": 1,
        "device": draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)),
        "state": "offline",
        "boot_id": draw(st.from_regex(r"[0-9a-f]{32}", fullmatch=True)),
        "ts": draw(st.floats(0, 4e9)),
        "groups": draw(st.lists(NAME, max_size=64)),
        "expired": draw(st.booleans()),
        "taken_over": draw(st.integers(0, 1 << 31)),
    }
    optional = {
        "model": MODEL,
        "applied": st.fixed_dictionaries(
            {
                "generation": st.integers(0, 10**9),
                "model": MODEL,
                "outcome": st.sampled_from(["installed", "failed", "refused", "rolled_back"]),
            },
            optional={"rollout": NAME, "reason": TEXT},
        ),
        "last_update": st.fixed_dictionaries(
            {"outcome": st.just("failed"), "message": TEXT, "ts": st.floats(0, 4e9)}
        ),
        "outbox": st.dictionaries(NAME, st.integers(0, 10**9), max_size=8),
        "shadow": st.dictionaries(NAME, TEXT, max_size=4),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            doc[name] = draw(strategy)
    return doc


@settings(max_examples=400, deadline=None)
@given(doc=statuses(), room=st.integers(0, 12_000))
def test_the_will_fits_its_room_says_what_it_lacks_and_the_cloud_reads_it(
    doc: dict[str, Any], room: int
) -> None:
    payload = bounded(doc, room)
    bare = json.dumps({**{k: doc[k] for k in BARE}, "trimmed": ["*"]}, separators=(",", ":"))
    if payload is None:  # only when not even the bare will fits
        assert room < len(bare.encode())
        return
    assert len(payload) <= room
    will = json.loads(payload)
    status = Status.model_validate_json(payload)  # what the cloud parses
    assert (status.device, status.state, status.boot_id) == (
        doc["device"],
        "offline",
        doc["boot_id"],
    )
    trimmed = will.pop("trimmed", None)
    if trimmed is None:
        assert will == doc  # the whole status: it fit
        return
    assert len(json.dumps(doc, separators=(",", ":")).encode()) > room
    if trimmed == ["*"]:
        assert set(will) == set(BARE)
        return
    for name in [*ESSENTIAL, *doc]:  # each field is there, whole, or named as cut
        if name in doc and name not in trimmed and f"{name}.reason" not in trimmed:
            assert will[name] == doc[name], name
    assert will["groups"] == doc["groups"][: len(will["groups"])]  # the first ones, in order
    assert ("groups" in trimmed) == (len(will["groups"]) < len(doc["groups"]))


@settings(max_examples=200, deadline=None)
@given(doc=statuses())
def test_within_the_budget_the_essentials_always_fit(doc: dict[str, Any]) -> None:
    """The fixed budget holds the essentials of any status with a short reason, and the groups
    are what goes first."""
    if "applied" in doc:
        doc["applied"].pop("reason", None)
    payload = bounded(doc, WILL_BYTES)
    assert payload is not None and len(payload) <= WILL_BYTES
    will = json.loads(payload)
    assert all(will[k] == doc[k] for k in ESSENTIAL if k in doc)


ID = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=400)


@settings(max_examples=200, deadline=None)
@given(
    client_id=ID,
    username=st.one_of(st.none(), ID),
    password=st.one_of(st.none(), ID),
    doc=statuses(),
    limit=st.integers(1024, 4096),
    protocol=st.sampled_from(["5", "3.1.1"]),
)
def test_the_connect_as_paho_encodes_it_fits_the_limit(
    tmp_path_factory: pytest.TempPathFactory,
    client_id: str,
    username: str | None,
    password: str | None,
    doc: dict[str, Any],
    limit: int,
    protocol: str,
) -> None:
    """``LastWill.set`` against paho's own encoding of the CONNECT (captured, never sent):
    with the will it sets, the packet is within ``limit``, or it set none and the CONNECT
    without one is what takes the room."""
    config = AgentConfig(
        device="dev-w", broker="mqtt://127.0.0.1:1", data_dir=tmp_path_factory.mktemp("w"),
        trust=[Path("unused.pub")], protocol=protocol, username=username, password=password,
    )  # fmt: skip
    client, _ = make_client(config, client_id)
    LastWill(lambda: ("edgebento/dev-w/status", doc), client_id, config).set(client, limit)
    sent: list[bytes] = []
    client._packet_queue = lambda _command, packet, *_rest, **_kw: sent.append(bytes(packet))  # type: ignore[method-assign]
    client.connect = lambda *_a, properties=None, **_kw: (  # type: ignore[method-assign]
        setattr(client, "_connect_properties", properties),
        client._send_connect(config.keepalive),
    )
    connect(client, config)
    (packet,) = sent
    if client._will:
        assert len(packet) <= limit
    else:
        without = connect_bytes(client_id, "edgebento/dev-w/status", username, password)
        assert without + len(bounded(doc, 10**6) or b"") > limit
        assert without + 200 > limit  # not even the bare will fit


def test_a_cut_for_the_limit_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = AgentConfig(
        device="dev-w", broker="mqtt://127.0.0.1:1", data_dir=tmp_path,
        trust=[tmp_path / "unused.pub"], protocol="3.1.1",
    )  # fmt: skip
    doc = {"schema_version": 1, "device": "dev-w", "state": "offline", "boot_id": "b" * 32,
           "ts": 1.0, "groups": [f"g{n}" * 20 for n in range(40)]}  # fmt: skip
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="c" * 600)
    will = LastWill(lambda: ("edgebento/dev-w/status", doc), "c" * 600, config)
    with caplog.at_level(logging.WARNING, "edge_agent.session"):
        will.set(client, 1024)
        will.set(client, 1024)  # the same cut: said once
        will.set(client, 10**6)  # the budget alone: nothing to say
        will.set(client, 900)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("the last will is cut to" in m for m in said), said
    assert "groups" in said[0]
    will.set(client, 700)  # not even the bare will: none
    assert "connecting with no last will" in caplog.records[-1].getMessage()
    assert not client._will
