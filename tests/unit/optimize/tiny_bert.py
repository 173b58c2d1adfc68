"""A BERT-like encoder layer built with onnx.helper, small enough for unit tests.

Token embedding, LayerNorm, one-head self-attention under an attention mask, a ReLU
feed-forward block and post-LayerNorms, giving ``last_hidden_state`` as a plain Hugging Face
export does. Like BERT's, its LayerNorms have a few channels far larger than the rest (the
activation outliers that per-tensor int8 handles badly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, FFN = 64, 32, 64
OUTLIERS = (3, 17)  # channels whose LayerNorm scale is OUTLIER times the others'
OUTLIER = 40.0


def build(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float | None = None) -> onnx.TensorProto:
        std = scale if scale is not None else 1 / np.sqrt(shape[0])
        return numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name)

    def norm_scale(name: str) -> onnx.TensorProto:
        gamma = np.ones(HIDDEN, np.float32)
        gamma[list(OUTLIERS)] = OUTLIER
        return numpy_helper.from_array(gamma, name)

    weights = [
        init("embedding", VOCAB, HIDDEN, scale=1.0),
        *(norm_scale(f"gamma{i}") for i in range(3)),
        *(numpy_helper.from_array(np.zeros(HIDDEN, np.float32), f"beta{i}") for i in range(3)),
        *(init(f"w_{n}", HIDDEN, HIDDEN) for n in ("q", "k", "v", "o")),
        init("w_up", HIDDEN, FFN),
        init("w_down", FFN, HIDDEN),
        numpy_helper.from_array(np.array(1 / np.sqrt(HIDDEN), np.float32), "scale"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["embedding", "input_ids"], ["emb"], name="embed"),
        node("LayerNormalization", ["emb", "gamma0", "beta0"], ["x"], name="ln0", axis=-1),
        *(node("MatMul", ["x", f"w_{n}"], [n], name=f"proj_{n}") for n in ("q", "k", "v")),
        node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["qk"], name="qk"),
        node("Mul", ["qk", "scale"], ["scores"], name="scaled"),
        node("Cast", ["attention_mask"], ["maskf"], name="maskf", to=TensorProto.FLOAT),
        node("Sub", ["one", "maskf"], ["masked"], name="masked"),
        node("Mul", ["masked", "neg"], ["bias"], name="bias"),
        node("Unsqueeze", ["bias", "axis1"], ["bias3"], name="bias3"),
        node("Add", ["scores", "bias3"], ["logits"], name="logits"),
        node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
        node("MatMul", ["probs", "v"], ["context"], name="context"),
        node("MatMul", ["context", "w_o"], ["attended"], name="proj_o"),
        node("Add", ["attended", "x"], ["res1"], name="res1"),
        node("LayerNormalization", ["res1", "gamma1", "beta1"], ["h"], name="ln1", axis=-1),
        node("MatMul", ["h", "w_up"], ["up"], name="ffn_up"),
        node("Relu", ["up"], ["act"], name="relu"),
        node("MatMul", ["act", "w_down"], ["down"], name="ffn_down"),
        node("Add", ["down", "h"], ["res2"], name="res2"),
        node(
            "LayerNormalization",
            ["res2", "gamma2", "beta2"],
            ["last_hidden_state"],
            name="ln2",
            axis=-1,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_bert",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", "attention_mask")
        ],
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]
            )
        ],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tokens(rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids, each row padded after a random length (at least 4 real tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(rows, length), dtype=np.int64)
    real = rng.integers(4, length + 1, size=rows)
    mask = (np.arange(length)[None, :] < real[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}
