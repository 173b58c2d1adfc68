"""What the agent answers over MQTT, as a client reads it (issue 18's smaller findings, issue 23
items 3 and 8), through a real agent process and Mosquitto.

On main: an empty device's 503 ``not_ready`` counted as ``outcome="error"`` (the figure a
rollout's error rate reads) and did not say how to install a model; an OIP request's fault came
back in the tensor-JSON envelope; an OIP ``id`` had no length cap; floats were written with
float64's 17 digits.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.agent import Client, wait_for, wait_online
from tests.support.agent_telemetry import DeviceWatch
from tests.support.services import Mosquitto

X = [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.123456789]]


def _oip(request_id: Any = None, **parameters: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": X[0]}],
        "parameters": parameters,
    }
    if request_id is not None:
        doc["id"] = request_id
    return doc


def test_an_empty_device_says_how_to_install_a_model_and_counts_no_error(
    agent_factory: Any, client: Client, broker: Mosquitto, topic_prefix: str
) -> None:
    watch = DeviceWatch(broker, topic_prefix, "dev-a")
    try:
        agent_factory()  # no --pack: nothing installed
        wait_online(client, topic_prefix, "dev-a")
        infer = f"{topic_prefix}/dev-a/infer"
        reply = client.request(infer, {"inputs": {"x": X}})
        assert reply["ok"] is False and reply["reason"] == "not_ready"
        # Every way there is, named for this device.
        for way in (
            f"{topic_prefix}/dev-a/cmd/deploy",
            "edgebento rollout",
            "--devices dev-a",
            "--pack",
        ):
            assert way in reply["error"], (way, reply["error"])
        oip = client.request(infer, _oip("o-1"))
        assert oip["reason"] == "not_ready" and "schema_version" not in oip
        watch.wait(lambda rs: watch.rejected("not_ready") >= 2)
        errors = sum(r["data"]["errors"] for r in watch.records if r["kind"] == "inference")
        assert errors == 0, "a device without a model counted its refusals as model errors"
    finally:
        watch.close()


def test_oip_faults_are_answered_in_oip_form_and_its_id_is_capped(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    infer = f"{topic_prefix}/dev-a/infer"
    replies = client.collect(f"{topic_prefix}-oip/replies")
    reply_to = f"{topic_prefix}-oip/replies"

    long_id = "i" * 129
    client.publish(infer, _oip(long_id, reply_to=reply_to))
    refused = wait_for(replies, lambda d: True)
    assert refused["ok"] is False and refused["reason"] == "invalid" and "128" in refused["error"]
    assert "schema_version" not in refused and "id" not in refused  # OIP's {"error"} form

    # A timeout no float can hold: whatever the core makes of it, the answer is OIP's.
    huge = json.loads('{"t": 1' + "0" * 400 + "}")["t"]
    client.publish(infer, _oip("t-1", reply_to=reply_to, timeout=huge))
    fault = wait_for(replies, lambda d: d.get("id") == "t-1")
    assert "schema_version" not in fault and "error" in fault, fault

    fine = client.request(infer, _oip("ok-1"))
    assert fine["ok"] is True and fine["id"] == "ok-1" and fine["outputs"][0]["datatype"] == "FP32"


def _float_literals(text: str) -> list[str]:
    return re.findall(r"-?\d+\.\d+(?:[eE][-+]?\d+)?", text)


def test_floats_are_written_by_the_codec_with_float32s_nine_digits(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, mlp_model: Path
) -> None:
    import onnxruntime as ort

    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    raw = client.collect(f"{topic_prefix}-raw/replies")
    expected = dict(
        zip(
            ["logits", "probs"],
            ort.InferenceSession(str(mlp_model)).run(None, {"x": np.asarray(X, np.float32)}),
            strict=True,
        )
    )
    for doc in ({"inputs": {"x": X}}, _oip(f"r-{uuid.uuid4().hex[:6]}")):
        request = {"id": uuid.uuid4().hex, **doc, "reply_to": f"{topic_prefix}-raw/replies"}
        client.publish(f"{topic_prefix}/dev-a/infer", request)
        msg = raw.get(timeout=20)
        text = msg.payload.decode()
        answer = json.loads(text)
        outputs = answer["outputs"]
        numbers = _float_literals(text[text.index('"outputs"') :])
        assert numbers
        for literal in numbers:
            mantissa = literal.lstrip("-").split("e")[0].split("E")[0].replace(".", "").lstrip("0")
            assert len(mantissa) <= 9, f"{literal} has float64's digits"
        got = (
            {t["name"]: np.asarray(t["data"], np.float32) for t in outputs}
            if isinstance(outputs, list)
            else {k: np.asarray(v, np.float32).reshape(-1) for k, v in outputs.items()}
        )
        for name, value in expected.items():  # nine digits name each float32 exactly
            assert np.array_equal(got[name], value.reshape(-1)), name
