"""The serving benchmarks' baselines answer what edgebento answers: the plain BentoML service
(``benchmarks/plain_bento``) and the bare ASGI app (``benchmarks/bare_asgi``), each really served
(``bentoml serve``, uvicorn), give the same outputs as edgebento's service for the same request,
and those are ONNX Runtime's. A baseline that answered something else would be measured doing
less work than edgebento."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.serving_common import (
    Process,
    import_to_store,
    start_bare_asgi,
    start_bento,
    start_plain_bento,
)
from modelpack import generate_keypair
from modelpack.writer import create_pack
from tests.support import models


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    work = tmp_path_factory.mktemp("bench-baselines")
    model = models.mlp(work / "mlp.onnx")
    key, pub = generate_keypair(work / "keys")
    create_pack(model, work / "pack", name="mlp", version=1, key=key)
    tag = import_to_store(work / "pack", pub, work / "bentoml")
    started: list[Process] = []
    try:
        edgebento = start_bento(work / "bentoml", tag, work, EDGEBENTO_WORKERS="1")
        started.append(edgebento)
        plain = start_plain_bento(model, work, workers=1)
        started.append(plain)
        bare = start_bare_asgi(model, work, workers=1)
        started.append(bare)
        yield (
            model,
            {
                "edgebento": edgebento.url + "/predict",
                "plain_bentoml": plain.url + "/predict",
                "bare_asgi": bare.url + "/predict",
            },
        )
    finally:
        for proc in started:
            proc.stop()


def test_every_baseline_answers_the_outputs_of_edgebento_and_onnxruntime(
    served: tuple[Path, dict[str, str]],
) -> None:
    model, urls = served
    x = np.random.default_rng(7).standard_normal((3, 8)).round(4).astype(np.float32)
    body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, {"x": x}), strict=True))
    answers = {}
    for server, url in urls.items():
        reply = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 200, (server, reply.text)
        outputs = reply.json()["outputs"]
        assert set(outputs) == set(names), server
        answers[server] = {n: np.asarray(outputs[n], dtype=np.float32) for n in names}
    for server, outputs in answers.items():
        for name in names:
            # Each writes float32 in its own way (9 digits, or float64's repr): read back as
            # float32, every value is ONNX Runtime's own.
            np.testing.assert_array_equal(outputs[name], expected[name], err_msg=server)
            np.testing.assert_array_equal(outputs[name], answers["edgebento"][name], err_msg=server)
