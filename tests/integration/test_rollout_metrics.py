"""Rollouts that abort on what the fleet's telemetry says while real traffic flows.

Real Mosquitto, moto's S3 server and three ``edge-agent`` processes serving v1; a background
thread sends inference requests to every device over MQTT during the rollout. v2 is a pack that
passes its own health check (its golden samples) but is much slower, or fails on some of the
inputs the devices really get: the rollout must see it in the telemetry of the canary, abort,
and send the canary back to v1.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_sync.rollout_store import load_state
from cloud_sync.store import open_store
from edgebento.cli import main
from tests.support.agent import AgentProcess, Client
from tests.support.fleet import rollout_ids, wait_versions
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow
DEVICES = ["a", "b", "c"]
NORMAL = [[0.25, -0.5, 1.0, 0.0, -1.0, 0.5, 0.75, -0.25]]
GLITCH = [[1000.0] * 8]  # a saturated sensor: v1 answers it, the fragile v2 does not


def _prepend(base: Path, out: Path, nodes: list[Any], inits: list[Any], feeds: str) -> Path:
    """``base``'s graph with ``nodes`` in front of it, reading ``feeds`` where it read ``x``."""
    import onnx

    model = onnx.load(str(base))
    graph = model.graph
    for node in graph.node:
        node.input[:] = [feeds if name == "x" else name for name in node.input]
    old = list(graph.node)
    graph.ClearField("node")
    graph.node.extend([*nodes, *old])
    graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def slow_mlp(base: Path, out: Path, size: int = 512, layers: int = 4) -> Path:
    """The same answers and io signature as ``base``; on a single row (what the devices' traffic
    sends) it first runs a chain of ``layers`` MatMuls of ``size``x``size`` that depends on the
    input (so nothing folds it away) and adds 0 to x. Its golden batch of 4 rows skips the chain:
    the health check's latency budget passes however busy the machine is (when the chain ran
    there too, a loaded machine failed the update at install, never reaching the p99 check).
    Four layers are about 25 ms a row on one core, ten times the p99 of ``base``: enough for
    the 3x check, and cheap enough that a busy machine still serves the canary its 20 requests
    well within the wave's time."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weight, "slow_w"),
        numpy_helper.from_array(np.zeros(1, np.float32), "slow_zero"),
        numpy_helper.from_array(np.array(0, np.int64), "slow_axis0"),
        numpy_helper.from_array(np.array(1, np.int64), "slow_one_row"),
    ]
    chain = [
        helper.make_node("ReduceMean", ["x"], ["slow_xm"], keepdims=0),
        helper.make_node("Add", ["slow_w", "slow_xm"], ["slow_h0"]),
    ]
    for i in range(layers):  # Tanh keeps the values finite, so 0 * sum stays 0
        chain += [
            helper.make_node("MatMul", [f"slow_h{i}", "slow_w"], [f"slow_m{i}"]),
            helper.make_node("Tanh", [f"slow_m{i}"], [f"slow_h{i + 1}"]),
        ]
    chain += [
        helper.make_node("ReduceSum", [f"slow_h{layers}"], ["slow_s"], keepdims=0),
        helper.make_node("Mul", ["slow_s", "slow_zero"], ["slow_then"]),
    ]
    zero = [helper.make_node("Identity", ["slow_zero"], ["slow_else"])]
    then_out, else_out = (
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])
        for name in ("slow_then", "slow_else")
    )
    nodes = [
        helper.make_node("Shape", ["x"], ["slow_shape"]),
        helper.make_node("Gather", ["slow_shape", "slow_axis0"], ["slow_rows"]),
        helper.make_node("Equal", ["slow_rows", "slow_one_row"], ["slow_single"]),
        helper.make_node(
            "If",
            ["slow_single"],
            ["slow_z"],
            then_branch=helper.make_graph(chain, "slow_chain", [], [then_out]),
            else_branch=helper.make_graph(zero, "no_chain", [], [else_out]),
        ),
        helper.make_node("Add", ["x", "slow_z"], ["slow_x"]),
    ]
    return _prepend(base, out, nodes, inits, "slow_x")


def fragile_mlp(base: Path, out: Path, limit: float = 100.0) -> Path:
    """``base`` behind a Reshape whose target shape is [-1, 8] for inputs up to ``limit`` and
    [-1, 9] above it, so ONNX Runtime fails at run time on such inputs (golden samples pass)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(limit, np.float32), "frag_limit"),
        numpy_helper.from_array(np.array([-1, 8], np.int64), "frag_shape"),
        numpy_helper.from_array(np.array([0, 1], np.int64), "frag_step"),
    ]
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["frag_max"], keepdims=0),
        helper.make_node("Greater", ["frag_max", "frag_limit"], ["frag_big"]),
        helper.make_node("Cast", ["frag_big"], ["frag_k"], to=TensorProto.INT64),
        helper.make_node("Mul", ["frag_step", "frag_k"], ["frag_d"]),
        helper.make_node("Add", ["frag_shape", "frag_d"], ["frag_target"]),
        helper.make_node("Reshape", ["x", "frag_target"], ["frag_x"]),
    ]
    return _prepend(base, out, nodes, inits, "frag_x")


class Traffic:
    """Inference requests to the devices, round robin, from a background thread; bounded in
    count and time. Replies come back to the client's reply topic.

    A device gets at most ``outstanding`` requests it has not answered yet, as a client that
    waits for its answers does. Sent at a fixed rate instead, the requests a slow model could
    not keep up with piled up at the broker (the agent answers MQTT requests one after another
    on its network thread by default), and the rollback the test waits for queued behind them:
    on a busy machine it reached the canary only after the rollout had stopped waiting."""

    def __init__(
        self,
        client: Client,
        prefix: str,
        devices: list[str],
        inputs: Callable[[int], list[list[float]]],
        rate: float = 30.0,
        limit: int = 3000,
        seconds: float = 60.0,
        outstanding: int = 2,
    ) -> None:
        self.client, self.prefix, self.devices, self.inputs = client, prefix, devices, inputs
        self.rate, self.limit, self.seconds = rate, limit, seconds
        self.outstanding = outstanding
        self.sent: dict[str, str] = {}  # request id -> device
        self._waiting: dict[str, dict[str, float]] = {d: {} for d in devices}  # id -> sent at
        self._replies: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _collect(self, timeout: float = 0.0) -> None:
        """Take the replies that arrived (waiting up to ``timeout`` for the first)."""
        q = self.client.queues[self.client.reply_topic]
        try:
            msg = q.get(timeout=timeout) if timeout else q.get_nowait()
            while True:
                reply = json.loads(msg.payload)
                self._replies.append(reply)
                device = self.sent.get(reply.get("id"))
                if device is not None:
                    self._waiting[device].pop(reply["id"], None)
                msg = q.get_nowait()
        except queue.Empty:
            pass

    def _free(self, device: str) -> bool:
        """Whether ``device`` may get another request now. One never answered (a reply lost
        with a dropped connection) stops counting after 30 s, so no device waits forever."""
        now = time.monotonic()
        waiting = self._waiting[device]
        for rid in [r for r, at in waiting.items() if now - at > 30.0]:
            del waiting[rid]
        return len(waiting) < self.outstanding

    def _run(self) -> None:
        until = time.monotonic() + self.seconds
        i = turn = 0
        while i < self.limit and not self._stop.is_set() and time.monotonic() <= until:
            self._collect()
            free = [d for d in self.devices if self._free(d)]
            if not free:  # every device busy with what it has: wait for an answer
                self._collect(timeout=1.0 / self.rate)
                continue
            device = self.devices[turn % len(self.devices)]
            turn += 1
            if device not in free:
                continue
            rid = f"req-{i}"
            request = {
                "id": rid,
                "reply_to": self.client.reply_topic,
                "inputs": {"x": self.inputs(i)},
            }
            i += 1
            self.sent[rid] = device
            self._waiting[device][rid] = time.monotonic()
            topic = f"{self.prefix}/{device}/infer"
            self.client.client.publish(topic, json.dumps(request).encode(), qos=1)
            self._stop.wait(1.0 / self.rate)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def replies(self) -> list[dict[str, Any]]:
        """Every reply received so far."""
        assert not self._thread.is_alive(), "replies are read once the traffic has stopped"
        self._collect()
        return list(self._replies)


def run_rollout(broker: Mosquitto, store_url: str, prefix: str, key: Path, *flags: str) -> int:
    """Each wave is judged on at least 20 inferences per device on v2, which the rollout waits
    for up to its wave timeout and bake (45 s from the push, as before); the bake itself, a fixed
    wait after a wave reported v2, is 5 s (it was 15 s, 20 s of waiting in a completed run)."""
    return main(
        [
            "rollout",
            "tiny",
            "2",
            "--store",
            store_url,
            "--broker",
            broker.url,
            "--prefix",
            prefix,
            "--devices",
            ",".join(DEVICES),
            "--canary",
            "30",
            "--waves",
            "1",
            "--min-inferences",
            "20",
            "--bake",
            "5",
            "--wave-timeout",
            "40",
            "--timeout",
            "60",
            "--key",
            str(key),
            "--json",
            *flags,
        ]
    )


def assert_aborted_back_on_v1(
    shown: dict[str, Any], broker: Mosquitto, store_url: str, prefix: str
) -> None:
    """The canary went back, the other waves never started, and the store says aborted."""
    assert {d["device"]: d["state"] for d in shown["devices"]} == {
        "a": "rolled_back",
        "b": "pending",
        "c": "pending",
    }
    wait_versions(broker, prefix, dict.fromkeys(DEVICES, 1))
    assert rollout_ids(store_url) == [shown["id"]]
    saved = load_state(open_store(store_url), shown["id"])
    assert saved.phase == "aborted" and saved.reason == shown["reason"]


def test_rollout_aborts_when_the_new_version_is_much_slower(
    fleet: Callable[..., list[AgentProcess]],
    broker: Mosquitto,
    topic_prefix: str,
    mlp_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    client: Client,
    keys: tuple[Path, Path],
) -> None:
    fleet(DEVICES, v2_model=slow_mlp(mlp_model, tmp_path / "slow.onnx"))
    store_url = fleet.store_url  # type: ignore[attr-defined]
    with Traffic(client, topic_prefix, DEVICES, lambda _i: NORMAL) as traffic:
        code = run_rollout(broker, store_url, topic_prefix, keys[0], "--abort-p99-ratio", "3")
    shown = json.loads(capsys.readouterr().out)
    assert code == 1 and shown["phase"] == "aborted", shown
    assert "p99 on v2 is" in shown["reason"] and "(over 3x)" in shown["reason"]
    assert_aborted_back_on_v1(shown, broker, store_url, topic_prefix)
    # Slow, never wrong: every reply is an answer or, for a request that waited in the queue
    # ahead of the slow model past its deadline, the agent's overload refusal (by design).
    replies = traffic.replies()
    refused = [r for r in replies if not r["ok"]]
    assert all(r["reason"] == "busy" for r in refused), refused[:3]
    assert {r["model"]["version"] for r in replies if r["ok"]} == {1, 2}


def test_inputs_the_new_version_cannot_run_are_the_clients_and_do_not_abort_the_rollout(
    fleet: Callable[..., list[AgentProcess]],
    broker: Mosquitto,
    topic_prefix: str,
    mlp_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    client: Client,
    keys: tuple[Path, Path],
) -> None:
    """v2 fails at run time on saturated inputs while a known-good input still runs: by the
    fault-classification rule (docs/serving.md) each such failure is the request's (reason
    ``invalid``, counted as rejected), never in the error rate the rollout reads, so a flood of
    them does not abort it (before, any client could abort a canary this way)."""
    fleet(DEVICES, v2_model=fragile_mlp(mlp_model, tmp_path / "fragile.onnx"))
    store_url = fleet.store_url  # type: ignore[attr-defined]
    glitchy = Traffic(
        client, topic_prefix, DEVICES, lambda i: GLITCH if (i // 3) % 2 else NORMAL, seconds=120
    )
    with glitchy as traffic:
        code = run_rollout(
            broker,
            store_url,
            topic_prefix,
            keys[0],
            "--abort-failure-rate",
            "20",
            "--abort-p99-ratio",
            "1000",
            "--timeout",
            "120",
        )
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and shown["phase"] == "completed", shown
    wait_versions(broker, topic_prefix, dict.fromkeys(DEVICES, 2))
    replies = traffic.replies()
    failed = [r for r in replies if not r["ok"]]
    assert failed and all(r["reason"] == "invalid" for r in failed), failed[:3]
    assert all("the model cannot run this input" in r["error"] for r in failed)
    assert any(r["ok"] and r["model"]["version"] == 2 for r in replies)
