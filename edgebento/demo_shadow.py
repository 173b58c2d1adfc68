"""The demo's shadow step: a v4 that answers another digit for about one input in ten (its
least confident ones) yet passes every install check (signed, its own golden samples) is rolled
out with ``--shadow``: both devices run it beside v2 on live traffic, and the rollout aborts on
their agreement before any device switches (docs/monitoring.md)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from edgebento.demo_fleet import DEVICES, Fleet, publish_all, running_versions
from edgebento.demo_runner import BIN, Demo, console
from edgebento.demo_traffic import paced_requests

CHANGED = 0.10  # the share of the eval set's answers v4 changes
ROWS, RATE, SECONDS = 8, 40, 12.0  # the live traffic while the shadows run


def _rotate_unsure(model: Path, io: Any, out: Path, eval_x: Any, share: float) -> None:
    """``model`` whose ``probs`` are rotated one class along in rows whose top probability is
    below the ``share`` quantile of the eval set's: another answer there, the same elsewhere."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from modelpack.predictor import Predictor

    proto = onnx.load(str(model))
    graph = proto.graph
    (output,) = [o for o in graph.output if o.name == "probs"]
    classes = output.type.tensor_type.shape.dim[1].dim_value
    top = Predictor(model, io.inputs, io.outputs).run({"x": eval_x})["probs"].max(axis=1)
    threshold = float(np.quantile(top, share))
    for node in graph.node:
        node.output[:] = ["probs_v2" if o == "probs" else o for o in node.output]
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    constants: dict[str, np.ndarray] = {
        "rotation": np.asarray([*range(1, classes), 0], dtype=np.int64),
        "unsure_below": np.asarray(threshold, dtype=np.float32),
        "class_axis": np.asarray([1], dtype=np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    reduce_max = (
        helper.make_node("ReduceMax", ["probs_v2", "class_axis"], ["top"], keepdims=1)
        if opset >= 18
        else helper.make_node("ReduceMax", ["probs_v2"], ["top"], axes=[1], keepdims=1)
    )
    graph.node.extend(
        [
            reduce_max,
            helper.make_node("Less", ["top", "unsure_below"], ["unsure"]),
            helper.make_node("Gather", ["probs_v2", "rotation"], ["rotated"], axis=1),
            helper.make_node("Where", ["unsure", "rotated", "probs_v2"], ["probs"]),
        ]
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


def _v4(demo: Demo, fleet: Fleet, v2: Path, eval_data: Path) -> Path:
    """v4 made, packed with its own golden samples, signed and published."""
    import numpy as np

    from modelpack import read_samples, write_samples
    from modelpack.loader import load_pack
    from modelpack.predictor import Predictor

    io = load_pack(v2, (fleet.keys / "signing.pub",)).manifest
    work = demo.workdir / "data"
    model = work / "digits-v4-unsure-rotated.onnx"
    _rotate_unsure(v2 / "model.onnx", io, model, np.load(eval_data)["x"], CHANGED)
    golden = read_samples(v2 / "samples.npz").inputs
    samples = work / "digits-v4-golden.npz"
    predictor = Predictor(model, io.inputs, io.outputs)
    write_samples(samples, golden, predictor.run(dict(golden)))
    out = demo.workdir / "packs" / "digits-4-subtly-broken"
    demo.run(
        BIN / "edgebento", "pack", "create", model, "--name", "digits", "--version", "4",
        "--out", out, "--samples", samples, "--key", fleet.keys / "signing.key", quiet=True,
    )  # fmt: skip
    demo.run(
        BIN / "edgebento", "publish", out, "--store", fleet.store,
        "--key", fleet.keys / "signing.key", quiet=True,
    )  # fmt: skip
    return out


def step_shadow(demo: Demo, fleet: Fleet, v2: Path, eval_data: Path) -> str:
    v4 = _v4(demo, fleet, v2, eval_data)
    console.print(
        f"[dim]{v4.name}: another digit for the {CHANGED:.0%} least confident answers, its own "
        f"golden samples (every install check passes); {RATE} requests/s of {ROWS} rows per "
        "device while the shadows run[/dim]"
    )
    stop = threading.Event()
    # Until the rollout ends (``stop``) or ``SECONDS``.
    lines = paced_requests(
        eval_data, DEVICES, "shadow", stop, rows=ROWS, rate=RATE, seconds=SECONDS, seed=4
    )
    traffic = threading.Thread(target=publish_all, args=(fleet, lines), daemon=True)
    traffic.start()
    try:
        done = demo.run(
            BIN / "edgebento", "rollout", "digits", "4", "--store", fleet.store,
            "--broker", fleet.url, "--devices", ",".join(DEVICES), "--canary", "100",
            "--shadow", "--shadow-for", "30s", "--shadow-rate", "50",
            "--shadow-min-devices", "1", "--agreement", "0.99", "--bake", "2",
            "--wave-timeout", "60", "--key", fleet.keys / "signing.key", "--timeout", "120",
            "--allow-unverified", "--json",
            check=False, quiet=True, env=fleet.pki.env_as("controller"),
        )  # fmt: skip
    finally:
        stop.set()
        traffic.join(timeout=30)
    if done.returncode == 0 or "{" not in done.stdout:
        console.print(done.stdout + done.stderr[-2000:])
        raise RuntimeError(f"the shadow rollout of v4 did not abort (exit {done.returncode})")
    state = json.loads(done.stdout[done.stdout.index("{") :])
    console.print(f"rollout {state['id']}: {state['phase']}: {state.get('reason')}")
    figures = {p["device"]: p["shadow"] for p in state["devices"] if p.get("shadow")}
    for device, f in sorted(figures.items()):
        console.print(f"  {device}: {f.get('verdict')}: {f.get('line')}")
    versions = running_versions(fleet, DEVICES)
    if any(v != 2 for v in versions.values()):
        raise RuntimeError(f"a device left v2 during the shadow rollout: {versions}")
    words = {"top1": "top-1 agreement", "cosine": "cosine"}
    shown = ", ".join(
        f"{d} {words.get(f.get('metric'), f.get('metric'))} {f['agreeing'] / f['rows']:.3f}"
        for d, f in sorted(figures.items())
        if f.get("rows")
    )
    if not shown:
        raise RuntimeError(f"no device reported shadow figures: {done.stderr[-800:]}")
    return f"shadow rollout of v4 aborted ({shown}; asked 0.99); devices never left v2: {versions}"
