"""The plain BentoML service a user writes without edgebento: an ONNX Runtime session in the
service and a ``@bentoml.api`` that takes the tensor JSON's ``inputs`` and answers its
``outputs`` (``{"inputs": {"x": [[...]]}}`` in, ``{"outputs": {"probs": [[...]]}}`` out).

A baseline of the serving benchmarks, served with ``bentoml serve service:PlainOnnx`` from this
folder. ``BASELINE_MODEL`` names the ONNX file, ``BASELINE_WORKERS`` the workers (the benchmark
gives it as many as edgebento's service runs). Each worker runs ONNX Runtime on one thread, as
edgebento's workers do, so the two differ in the serving path only: BentoML's defaults
otherwise (pydantic validation of the body, the sync API in BentoML's thread, its middleware).
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
import numpy as np
import onnxruntime as ort

DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@bentoml.service(workers=int(os.environ.get("BASELINE_WORKERS", "1")))
class PlainOnnx:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.environ["BASELINE_MODEL"], options, providers=["CPUExecutionProvider"]
        )
        self.dtypes = {i.name: DTYPES[i.type] for i in self.session.get_inputs()}
        self.names = [o.name for o in self.session.get_outputs()]

    @bentoml.api
    def predict(self, inputs: dict[str, list[Any]]) -> dict[str, Any]:
        feed = {k: np.asarray(v, dtype=self.dtypes[k]) for k, v in inputs.items()}
        outputs = self.session.run(self.names, feed)
        return {"outputs": {n: o.tolist() for n, o in zip(self.names, outputs, strict=True)}}
