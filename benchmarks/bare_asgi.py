"""The ceiling of Python HTTP serving on the machine: a raw ASGI callable on uvicorn (uvloop and
httptools, no framework, no validation, no queue), with the same model and edgebento's JSON codec
(``json`` in, ``modelpack.codec``'s writer out, so the answer's numbers are the same bytes).

A baseline of the serving benchmarks: ``uvicorn benchmarks.bare_asgi:app --workers N``
with ``BASELINE_MODEL`` naming the ONNX file. ``POST`` any path with ``{"inputs": {...}}``;
``GET /ping`` answers ``ok``. ONNX Runtime runs on one thread, on the event loop's own (for a
model of a millisecond or less, a hand-off to another thread costs more than it frees).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort

from modelpack.codec import dumps, encode_tensor

DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        os.environ["BASELINE_MODEL"], options, providers=["CPUExecutionProvider"]
    )


SESSION = _session()
INPUT_DTYPES = {i.name: DTYPES[i.type] for i in SESSION.get_inputs()}
OUTPUTS = [o.name for o in SESSION.get_outputs()]
JSON = [(b"content-type", b"application/json")]


def predict(body: bytes) -> bytes:
    doc = json.loads(body)
    feed = {k: np.asarray(v, dtype=INPUT_DTYPES[k]) for k, v in doc["inputs"].items()}
    outputs = SESSION.run(OUTPUTS, feed)
    return dumps(
        {"outputs": {n: encode_tensor(o, body=True) for n, o in zip(OUTPUTS, outputs, strict=True)}}
    )


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    status = 200
    if scope["method"] == "GET":
        answer = b"ok"
    else:
        try:
            answer = predict(body)
        except Exception as exc:  # a baseline still answers a bad request, as a 400
            status, answer = 400, json.dumps({"error": str(exc)}).encode()
    headers = [*JSON, (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})
