"""Why int8 does or does not beat FP32 on a CNN: ONNX Runtime's kernels on the model's own convs.

For each PP-OCR model (and open_nsfw), the convolutions that cost the most multiply-adds at the
benchmark's input size, plus the costliest depthwise one, are each built as a one-node ONNX
model three ways and timed side by side (alternated, median of rounds, one thread so that the
other helpers' load moves every variant alike):

- FP32 ``Conv``;
- QDQ int8 (``QuantizeLinear -> DequantizeLinear`` around a per-channel int8 weight), what
  ``edgebento optimize``'s static candidates write; ORT fuses it into ``QLinearConv``;
- ``QLinearConv`` written directly (the QOperator format).

A model gains from int8 only where its convolutions do; a depthwise conv (MobileNetV3) has too
few multiply-adds per byte for int8 to pay for the quantize/dequantize around it.

The int8 models are built once (set-up); every timing (each conv's variants, each model's
profiles) is then taken in ``EDGEBENTO_BENCH_RUNS`` rounds (3 by default), the order of the
variants rotated between rounds: each figure is the rounds' median with its range.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_optimize_images import source
from benchmarks.real_images import FEEDS

# The benchmark's input size per model (batch, then the image); see bench_optimize_images.
SHAPES = {
    "ppocr_cls": [8, 3, 48, 192],
    "ppocr_det": [8, 3, 128, 128],
    "ppocr_rec": [8, 3, 48, 320],
    "open_nsfw": [8, 224, 224, 3],
}
TOP = 3  # the costliest dense convs of each model, beside its costliest depthwise one
ROUNDS = 7


def conv_shapes(model_path: Path, shape: list[int]) -> list[dict[str, Any]]:
    """Every Conv with its input size at ``shape``: channels, kernel, group, stride, MACs."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, shape, strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = value
    model = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.input]}
    weights = {w.name: numpy_helper.to_array(w) for w in model.graph.initializer}
    for node in model.graph.node:  # paddle2onnx writes weights as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            weights[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights or node.input[0] not in known:
            continue
        in_dims = [d.dim_value for d in known[node.input[0]].type.tensor_type.shape.dim]
        if len(in_dims) != 4 or 0 in in_dims:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = weights[node.input[1]]
        strides = list(attrs.get("strides", [1, 1]))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        group = int(attrs.get("group", 1))
        out_h = (in_dims[2] + pads[0] + pads[2] - w.shape[2]) // strides[0] + 1
        out_w = (in_dims[3] + pads[1] + pads[3] - w.shape[3]) // strides[1] + 1
        macs = in_dims[0] * out_h * out_w * int(np.prod(w.shape))
        found.append(
            {
                "node": node.name,
                "input": in_dims,
                "weight": list(w.shape),
                "group": group,
                "strides": strides,
                "pads": pads,
                "depthwise": group > 1 and group == in_dims[1],
                "macs": int(macs),
            }
        )
    return found


def _tiny(conv: dict[str, Any], kind: str) -> Any:
    """One conv as a model: FP32, QDQ around it, or a QLinearConv."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal(conv["weight"]).astype(np.float32) * 0.1
    cout = conv["weight"][0]
    attrs = {"group": conv["group"], "strides": conv["strides"], "pads": conv["pads"]}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, conv["input"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [] if kind == "qlinear" else [numpy_helper.from_array(np.zeros(cout, np.float32), "b")]
    w_scale = (np.abs(w).reshape(cout, -1).max(1) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    act = [
        numpy_helper.from_array(np.float32(8 / 255), "x_scale"),
        numpy_helper.from_array(np.uint8(128), "x_zero"),
        numpy_helper.from_array(np.float32(8 / 255), "y_scale"),
        numpy_helper.from_array(np.uint8(128), "y_zero"),
    ]
    if kind == "fp32":
        inits.append(numpy_helper.from_array(w, "w"))
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)]
    else:
        inits += [
            *act,
            numpy_helper.from_array(w_q, "w_q"),
            numpy_helper.from_array(w_scale, "w_scale"),
            numpy_helper.from_array(np.zeros(cout, np.int8), "w_zero"),
        ]
        if kind == "qdq":
            nodes = [
                helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
                helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
                helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["wd"], axis=0),
                helper.make_node("Conv", ["xd", "wd", "b"], ["c"], **attrs),
                helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zero"], ["cq"]),
                helper.make_node("DequantizeLinear", ["cq", "y_scale", "y_zero"], ["y"]),
            ]
        else:  # QOperator: what ORT fuses the QDQ form into, written by hand
            bias = np.zeros(cout, np.int32)
            inits.append(numpy_helper.from_array(bias, "b_q"))
            nodes = [
                helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
                helper.make_node(
                    "QLinearConv",
                    [
                        "xq",
                        "x_scale",
                        "x_zero",
                        "w_q",
                        "w_scale",
                        "w_zero",
                        "y_scale",
                        "y_zero",
                        "b_q",
                    ],
                    ["cq"],
                    **attrs,
                ),
                helper.make_node("DequantizeLinear", ["cq", "y_scale", "y_zero"], ["y"]),
            ]
    graph = helper.make_graph(nodes, kind, [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def time_conv(
    conv: dict[str, Any], tmp: Path, threads: int = 1, rotate: int = 0
) -> dict[str, float]:
    """Median ms per call of each variant, the variants alternated round by round (their order
    rotated by ``rotate``)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = {}
    kinds = ["fp32", "qdq", "qlinear"]
    for kind in kinds[rotate % 3 :] + kinds[: rotate % 3]:
        path = tmp / f"{kind}.onnx"
        onnx.save(_tiny(conv, kind), str(path))
        sessions[kind] = ort.InferenceSession(str(path), options, ["CPUExecutionProvider"])
    x = np.random.default_rng(1).uniform(-1, 1, conv["input"]).astype(np.float32)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(ROUNDS):
        for kind, session in sessions.items():
            session.run(None, {"x": x})  # warm
            start = time.perf_counter()
            runs = 0
            while time.perf_counter() - start < 0.15 or runs < 3:
                session.run(None, {"x": x})
                runs += 1
            samples[kind].append((time.perf_counter() - start) / runs * 1000)
    return {k: round(statistics.median(samples[k]), 4) for k in kinds}


def chosen_convs(convs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dense = sorted((c for c in convs if not c["depthwise"]), key=lambda c: -c["macs"])[:TOP]
    depthwise = sorted((c for c in convs if c["depthwise"]), key=lambda c: -c["macs"])[:1]
    return dense + depthwise


def _int8(model: Path, name: str, tmp: Path, grouped_float: bool = False) -> Path:
    """All-int8 static QDQ (MinMax, per-channel) as the search builds its first candidate,
    calibrated on 16 real rows; ``grouped_float`` keeps the grouped (depthwise) convs in float."""
    from optimize.data import Dataset
    from optimize.load import NormalizeConfig, normalize
    from optimize.quantize import PreprocessConfig, QuantizeConfig, preprocess, quantize_with

    normalized, prepared = tmp / f"{name}-n.onnx", tmp / f"{name}-p.onnx"
    out = tmp / f"{name}-{grouped_float}.onnx"
    normalize(model, normalized, NormalizeConfig())
    preprocess(normalized, prepared, PreprocessConfig(skip_symbolic_shape=True))
    rows = FEEDS[name](16, "calibration")
    quantize = quantize_with(Dataset(rows, None, dict.fromkeys(rows, 0)))
    import onnx

    grouped = [
        n.name
        for n in onnx.load(str(prepared)).graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    config = QuantizeConfig(
        mode="static", per_channel=True, exclude=tuple(grouped) if grouped_float else ()
    )
    quantize(prepared, out, config)  # type: ignore[operator]
    return out


def profiles(
    models: dict[str, Path], feed: dict[str, np.ndarray], tmp: Path, runs: int = 5
) -> dict[str, dict[str, Any]]:
    """Kernel time per op type of each model, one thread, the median of ``runs`` profiled runs
    after a warm one (ORT's profiler): where a model's time goes, FP32 against int8. The models
    run interleaved (one run of each in turn, the order rotating), so that other work on the
    machine lands on every model alike rather than on whichever was profiled in its moment."""

    import onnxruntime as ort

    sessions = {}
    for key, model in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp / f"{key}-{model.stem}")
        sessions[key] = ort.InferenceSession(str(model), options, ["CPUExecutionProvider"])
    names = list(sessions)
    for r in range(runs + 1):  # the first run of each is its warm one
        for key in names[r % len(names) :] + names[: r % len(names)]:
            sessions[key].run(None, feed)
    return {k: _by_op(Path(s.end_profiling()), runs) for k, s in sessions.items()}


def _by_op(trace: Path, runs: int) -> dict[str, Any]:
    """The median kernel milliseconds per op type (top 8) and in all, of the profiled runs
    after the first."""
    import json

    events = json.loads(trace.read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (runs + 1)
    totals: list[dict[str, float]] = []
    for r in range(1, runs + 1):
        by_op: dict[str, float] = {}
        for e in kernels[r * per_run : (r + 1) * per_run]:
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1000
        totals.append(by_op)
    ops = {op for t in totals for op in t}
    median = {op: statistics.median(t.get(op, 0.0) for t in totals) for op in ops}
    total = statistics.median(sum(t.values()) for t in totals)
    top = sorted(median.items(), key=lambda kv: -kv[1])[:8]
    return {"total_ms": round(total, 2), "ms": {k: round(v, 2) for k, v in top}}


def _round(prepared: dict[str, Any], tmp: Path, round_: int) -> dict[str, Any]:
    """One round of every timing: each conv's variants, then each model's profiles, in an
    order rotated by ``round_`` so that no variant is always timed first."""
    found: dict[str, Any] = {}
    for name, p in prepared.items():
        timed = {}
        for i, conv in enumerate(p["chosen"]):  # by place: a node may have no name
            ms = time_conv(conv, tmp, rotate=round_)
            timed[str(i)] = {
                "ms": ms,
                "qdq_speedup": round(ms["fp32"] / ms["qdq"], 3),
                "qlinear_speedup": round(ms["fp32"] / ms["qlinear"], 3),
                "gmacs_per_s_fp32": round(conv["macs"] / ms["fp32"] / 1e6, 2),
            }
        variants = {k: v for k, v in p["variants"].items() if v is not None}
        names = list(variants)
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        by_variant = profiles({k: variants[k] for k in order}, p["feed"], tmp)
        fp32, int8, grouped = (by_variant.get(k) for k in ("fp32", "int8", "grouped"))
        assert fp32 is not None and int8 is not None
        found[name] = {
            "profile_fp32": fp32,
            "profile_int8_qdq": int8,
            "int8_speedup": round(fp32["total_ms"] / int8["total_ms"], 3),
            "conv_share_fp32": round(fp32["ms"].get("Conv", 0.0) / fp32["total_ms"], 3),
            "timed": timed,
        }
        if grouped is not None:
            found[name] |= {
                "profile_int8_depthwise_float": grouped,
                "int8_depthwise_float_speedup": round(fp32["total_ms"] / grouped["total_ms"], 3),
            }
    return found


def run(results_dir: Path) -> dict[str, Any]:
    import os

    from benchmarks.figure import num
    from benchmarks.runs import rounds, summarize
    from optimize.machine import describe

    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgebento-kernels-") as tmp:
        # Set-up, once: the convs to time, the int8 models (calibrated) and the feeds.
        prepared: dict[str, Any] = {}
        for name, shape in SHAPES.items():
            convs = conv_shapes(source(name), shape)
            dw_macs = sum(c["macs"] for c in convs if c["depthwise"])
            prepared[name] = {
                "convs": convs,
                "dw_macs": dw_macs,
                "chosen": chosen_convs(convs),
                "feed": FEEDS[name](shape[0], "eval"),
                "variants": {
                    "fp32": source(name),
                    "int8": _int8(source(name), name, Path(tmp)),
                    "grouped": _int8(source(name), name, Path(tmp), True) if dw_macs else None,
                },
            }
        found = summarize([_round(prepared, Path(tmp), r) for r in range(rounds())])
    for name, p in prepared.items():
        f = found[name]
        models[name] = {
            "input": SHAPES[name],
            "profile_fp32": f["profile_fp32"],
            "profile_int8_qdq": f["profile_int8_qdq"],
            "profile_int8_depthwise_float": f.get("profile_int8_depthwise_float"),
            "int8_speedup": f["int8_speedup"],
            "int8_depthwise_float_speedup": f.get("int8_depthwise_float_speedup"),
            "conv_share_fp32": f["conv_share_fp32"],
            "convs": len(p["convs"]),
            "depthwise_share_of_conv_macs": round(
                p["dw_macs"] / max(1, sum(c["macs"] for c in p["convs"])), 4
            ),
            "timed": [conv | f["timed"][str(i)] for i, conv in enumerate(p["chosen"])],
        }
    machine = describe()
    return {
        "headline": "; ".join(
            f"{k}: whole model int8 {num(v['int8_speedup'], '.3f', 'x')} FP32"
            + (
                f" ({num(v['int8_depthwise_float_speedup'], '.3f', 'x')} depthwise in float)"
                if v["int8_depthwise_float_speedup"]
                else ""
            )
            + ", convs "
            + ", ".join(
                f"{'dw ' if t['depthwise'] else ''}{t['weight'][0]}x{t['weight'][1]}x"
                f"{t['weight'][2]}x{t['weight'][3]} QDQ {num(t['qdq_speedup'], '.3f', 'x')}"
                for t in v["timed"]
            )
            for k, v in models.items()
        )
        + f"; median of {rounds()} rounds",
        "targets_met": None,  # an explanation, not a target
        "threads": 1,
        "niced": os.nice(0) > 0,
        "cpu_flags": machine.get("flags"),
        "models": models,
    }
