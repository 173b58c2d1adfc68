"""A tiny sequence model (token embeddings, masked mean pooling) and packs for the bentos tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modelpack import SequenceInput, create_pack

VOCAB, DIM = 50, 4


def sequence_model(path: Path, seed: int = 0) -> Path:
    """input_ids, attention_mask [batch, seq] int64 -> hidden [batch, seq, 4], pooled [batch, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(seed).standard_normal((VOCAB, DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["hidden"]),
        helper.make_node("ReduceSum", ["hidden", "one"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "one"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["pooled"]),
    ]
    graph = helper.make_graph(
        nodes,
        "seq",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", DIM]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", DIM]),
        ],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def sequence_pack(out: Path, key: Path, name: str = "seq", version: int = 1) -> Path:
    model = sequence_model(out.parent / f"{name}.onnx")
    create_pack(
        model,
        out,
        name=name,
        version=version,
        key=key,
        sequence=[SequenceInput(input="input_ids", axis=1, mask_input="attention_mask")],
    )
    return out


def tokens(length: int, seed: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1, VOCAB, size=(1, length), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((1, length), dtype=np.int64)}
