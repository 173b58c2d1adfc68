"""Property tests of the device protocol: exact topic parsing, filter overlap, and documents
that either validate or raise a ValidationError, and survive a round trip; what a status says
only to be shown never costs the rest of it."""

from __future__ import annotations

import contextlib
import json

import paho.mqtt.client as mqtt
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cloud_sync.protocol import (
    COMMAND_MODELS,
    Desired,
    ModelRef,
    Status,
    TelemetryAck,
    TelemetryBatch,
    Topics,
    filters_overlap,
)

PLAIN = st.text(st.characters(blacklist_characters="/+#$\x00"), min_size=1, max_size=12)
PREFIX = st.lists(PLAIN, min_size=1, max_size=3).map("/".join)
ANY_TOPIC = st.lists(st.sampled_from(["a", "b", "cmd", "group", "+", "#", "", "status"]),
                     min_size=1, max_size=6).map("/".join)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(PREFIX, PLAIN, PLAIN)
def test_each_topic_parses_back_to_what_built_it(prefix: str, device: str, name: str) -> None:
    t = Topics(prefix)
    if device == "group":
        return
    assert t.parse(t.cmd(device, name)) == t.parse(t.cmd(device, name))
    parsed = t.parse(t.cmd(device, name))
    assert parsed is not None and (parsed.kind, parsed.device, parsed.name) == ("cmd", device, name)
    for build, kind in ((t.status, "status"), (t.infer, "infer"), (t.desired, "desired"),
                        (t.telemetry, "telemetry"), (t.telemetry_ack, "telemetry_ack")):  # fmt: skip
        got = t.parse(build(device))
        assert got is not None and (got.kind, got.device) == (kind, device)
    group = t.parse(t.group_cmd(device, name))
    assert group is not None and (group.kind, group.group, group.name) == (
        "group_cmd",
        device,
        name,
    )
    assert t.parse(t.cmd(device, name) + "/extra") is None  # exact: nothing after the name
    assert t.parse(f"x{prefix}/{device}/status") is None


@given(ANY_TOPIC)
def test_parsing_any_topic_never_raises(topic: str) -> None:
    Topics("a").parse(topic)


@given(
    ANY_TOPIC, ANY_TOPIC, st.lists(st.sampled_from(["a", "b", "cmd", "x"]), min_size=1, max_size=6)
)
def test_overlap_is_symmetric_and_never_misses_a_shared_topic(a: str, b: str, levels: list) -> None:
    assert filters_overlap(a, b) == filters_overlap(b, a)
    topic = "/".join(levels)
    try:
        both = mqtt.topic_matches_sub(a, topic) and mqtt.topic_matches_sub(b, topic)
    except ValueError:
        return  # not a valid filter
    if both:
        assert filters_overlap(a, b)


@settings(max_examples=300)
@given(JSON)
def test_documents_validate_or_raise_a_validation_error(doc: object) -> None:
    data = json.dumps(doc).encode()
    for model in (Status, Desired, TelemetryBatch, TelemetryAck, *COMMAND_MODELS.values()):
        with contextlib.suppress(ValidationError):
            model.model_validate_json(data)


RECORD = st.fixed_dictionaries(
    {
        "device": st.just("d1"),
        "boot_id": st.just("b1"),
        "seq": st.integers(min_value=0, max_value=2**40),
        "ts": st.floats(min_value=0, max_value=4e9),
        "kind": st.sampled_from(["heartbeat", "inference", "update", "event", "capture"]),
        "data": st.dictionaries(
            st.text(max_size=6), st.integers() | st.text(max_size=6), max_size=3
        ),
    }
)


@given(st.lists(RECORD, min_size=1, max_size=5))
def test_a_batch_survives_a_round_trip(records: list) -> None:
    floor = min(r["seq"] for r in records)
    batch = TelemetryBatch.model_validate({"records": records, "floor": floor})
    again = TelemetryBatch.model_validate_json(batch.model_dump_json())
    assert again == batch
    bad = {"records": records, "floor": floor + 1}
    try:
        TelemetryBatch.model_validate(bad)
    except ValidationError:
        return
    raise AssertionError("a record below the floor was accepted")


@settings(max_examples=300)
@given(said=JSON)
def test_whatever_a_device_says_of_takeovers_the_rest_of_its_status_stands(said: object) -> None:
    """``Status.taken_over`` is shown, never decided on: a count that is no count (negative,
    huge, not a number) is dropped, never the status the cloud reads state and model from."""
    doc = {"device": "d", "state": "online", "model": {"name": "m", "version": 3}}
    status = Status.model_validate_json(json.dumps({**doc, "taken_over": said}))
    assert (status.device, status.state, status.model) == (
        "d",
        "online",
        ModelRef(name="m", version=3),
    )
    if isinstance(said, int) and not isinstance(said, bool) and 0 <= said <= 1 << 31:
        assert status.taken_over == said
    else:  # 3.0 and "3" read as 3, as pydantic reads any int field
        assert status.taken_over is None or 0 <= status.taken_over <= 1 << 31
