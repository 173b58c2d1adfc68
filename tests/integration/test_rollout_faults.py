"""A flood of client-caused failures does not hide a broken model from a rollout (issue 18):
the fault classification runs a known-good input again for every failed run, and only the
failures it also hits count in the error rate. Real Mosquitto, moto's S3 server and three
``edge-agent`` processes, as in test_rollout_metrics.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_rollout_metrics import (
    DEVICES,
    GLITCH,
    NORMAL,
    Traffic,
    _prepend,
    assert_aborted_back_on_v1,
    run_rollout,
)
from tests.support.agent import AgentProcess, Client
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow
# ONNX Runtime's RandomUniform with this seed draws its first ten values below LIMIT (the
# health check's runs pass) and about 60% of the next thirty above it (checked below).
SEED, LIMIT = 2275, 0.43


def _draws(n: int) -> list[float]:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("RandomUniform", [], ["r"], shape=[1], seed=float(SEED))],
        "draws",
        [],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [float(session.run(None, {})[0][0]) for _ in range(n)]


def flaky_fragile_mlp(base: Path, out: Path) -> Path:
    """``base`` behind a Reshape that fails on saturated inputs (over 100: the client's, a
    known-good input still runs) and, from its eleventh run on, on about 60% of runs whatever
    the input (the model's: its known-good input fails as often)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(100.0, np.float32), "ff_limit"),
        numpy_helper.from_array(np.array([LIMIT], np.float32), "ff_luck"),
        numpy_helper.from_array(np.array([-1, 8], np.int64), "ff_shape"),
        numpy_helper.from_array(np.array([0, 1], np.int64), "ff_step"),
    ]
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["ff_max"], keepdims=0),
        helper.make_node("Greater", ["ff_max", "ff_limit"], ["ff_big"]),
        helper.make_node("RandomUniform", [], ["ff_r"], shape=[1], seed=float(SEED)),
        helper.make_node("Greater", ["ff_r", "ff_luck"], ["ff_unlucky1"]),
        helper.make_node("Squeeze", ["ff_unlucky1"], ["ff_unlucky"]),
        helper.make_node("Or", ["ff_big", "ff_unlucky"], ["ff_fail"]),
        helper.make_node("Cast", ["ff_fail"], ["ff_k"], to=TensorProto.INT64),
        helper.make_node("Mul", ["ff_step", "ff_k"], ["ff_d"]),
        helper.make_node("Add", ["ff_shape", "ff_d"], ["ff_target"]),
        helper.make_node("Reshape", ["x", "ff_target"], ["ff_x"]),
    ]
    return _prepend(base, out, nodes, inits, "ff_x")


def test_a_flood_of_client_faults_does_not_hide_a_model_that_fails_on_its_own(
    fleet: Callable[..., list[AgentProcess]],
    broker: Mosquitto,
    topic_prefix: str,
    mlp_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    client: Client,
    keys: tuple[Path, Path],
) -> None:
    draws = _draws(40)
    assert max(draws[:10]) < LIMIT and sum(d > LIMIT for d in draws[10:]) >= 15, draws
    fleet(DEVICES, v2_model=flaky_fragile_mlp(mlp_model, tmp_path / "flaky.onnx"))
    store_url = fleet.store_url  # type: ignore[attr-defined]
    flood = Traffic(client, topic_prefix, DEVICES, lambda i: GLITCH if (i // 3) % 2 else NORMAL)
    with flood as traffic:
        code = run_rollout(
            broker,
            store_url,
            topic_prefix,
            keys[0],
            "--abort-failure-rate",
            "20",
            "--abort-p99-ratio",
            "1000",
        )
    printed = capsys.readouterr()
    assert printed.out, printed.err  # the rollout's outcome, as JSON
    shown = json.loads(printed.out)
    assert code == 1 and shown["phase"] == "aborted", shown
    assert "inference error rate on v2" in shown["reason"], shown["reason"]
    assert_aborted_back_on_v1(shown, broker, store_url, topic_prefix)
    failed = [r for r in traffic.replies() if not r["ok"]]
    reasons = {r["reason"] for r in failed}
    # Both kinds were there: the clients' (saturated inputs, a known-good input still ran)
    # and the model's (its known-good input failed too).
    assert reasons == {"invalid", "internal"}, reasons
    assert {traffic.sent[r["id"]] for r in failed} == {"a"}  # only the canary ran v2
