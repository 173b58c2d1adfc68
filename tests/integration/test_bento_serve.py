"""`bentoml serve .` from the repo root, really serving packs imported with the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelpack import load_pack
from tests.support.promtool import assert_promtool_passes
from tests.support.services import LOOPBACK, free_port
from tests.unit.bentos.seqmodel import sequence_pack, tokens

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MAX_BODY = 65536


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    home: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_server(
    home: Path, model: str, log: Path, extra_env: dict[str, str] | None = None
) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "EDGEBENTO_MODEL": model,
        "EDGEBENTO_MAX_BODY_BYTES": str(MAX_BODY),
        "BENTOML_DO_NOT_TRACK": "true",
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", ".", "--host", LOOPBACK, "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(f"http://{LOOPBACK}:{port}", process, log, home)


def wait_ready(server: Server, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited: {server.log.read_text()[-2000:]}")
        try:
            if httpx.get(server.url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"bentoml serve not ready: {server.log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path], mlp_model: Path
) -> Iterator[dict[str, Server]]:
    from modelpack import Samples, create_pack
    from tests.support import models

    work = tmp_path_factory.mktemp("bento")
    home = work / "bentoml"
    tiny = work / "tiny"
    inputs, outputs = models.golden_samples(mlp_model)
    create_pack(
        mlp_model, tiny, name="tiny", version=1, samples=Samples(inputs, outputs), key=keys[0]
    )
    seq = sequence_pack(work / "seq", keys[0])
    env = {**os.environ, "BENTOML_HOME": str(home)}
    for pack in (tiny, seq):
        done = subprocess.run(
            [str(BIN / "edgebento"), "bento", "import", str(pack), "--pub", str(keys[1])],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert "stored" in done.stdout
    running = {
        "tiny": start_server(home, "tiny:latest", work / "tiny.log"),
        "seq": start_server(home, "seq:v1", work / "seq.log"),
    }
    try:
        for server in running.values():
            wait_ready(server)
        yield running
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="module")
def tiny(servers: dict[str, Server]) -> str:
    return servers["tiny"].url


@pytest.fixture(scope="module")
def tiny_with_cors(
    servers: dict[str, Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The tiny pack again, with BentoML's CORS turned on in a BentoML config file."""
    work = tmp_path_factory.mktemp("cors")
    config = work / "bentoml.yaml"
    config.write_text(
        "services:\n  edgebento:\n    http:\n      cors:\n        enabled: true\n"
        '        access_control_allow_origins: ["https://app.example"]\n'
        '        access_control_allow_methods: ["GET", "POST"]\n'
    )
    home = servers["tiny"].home
    server = start_server(home, "tiny:latest", work / "cors.log", {"BENTOML_CONFIG": str(config)})
    try:
        wait_ready(server)
        yield server.url
    finally:
        server.stop()


def test_predict_answers_the_golden_outputs(
    tiny: str, signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    samples = load_pack(signed_pack, [keys[1]]).samples
    assert samples is not None
    reply = httpx.post(tiny + "/predict", json={"inputs": {"x": samples.inputs["x"].tolist()}})
    assert reply.status_code == 200
    body = reply.json()
    assert body["model"] == {"name": "tiny", "version": 1}
    assert body["latency_ms"] >= 0
    np.testing.assert_allclose(
        body["outputs"]["probs"], samples.outputs["probs"], rtol=1e-5, atol=1e-6
    )


BAD = [
    (b"", "empty_body", 400),
    (b"{nope", "invalid_json", 400),
    (b'"just a string"', "invalid", 400),
    (json.dumps({"inputs": {"y": [[1.0] * 8]}}).encode(), "unknown_input", 400),
    (json.dumps({"inputs": {"x": [[1.0] * 5]}}).encode(), "shape", 400),
    (json.dumps({"inputs": {"x": [["one"] * 8]}}).encode(), "dtype", 400),
    (
        json.dumps({"inputs": {"x": {"dtype": "complex", "shape": [1], "b64": ""}}}).encode(),
        "dtype",
        400,
    ),
    (b'{"inputs": {"x": [[' + b"1.0, " * (MAX_BODY // 5) + b"1.0]]}}", "too_large", 413),
]


@pytest.mark.parametrize(
    ("body", "reason", "status"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)]
)
def test_bad_requests_are_4xx_with_the_reason(
    tiny: str, body: bytes, reason: str, status: int
) -> None:
    reply = httpx.post(
        tiny + "/predict", content=body, headers={"content-type": "application/json"}
    )
    assert reply.status_code == status
    assert reply.json()["reason"] == reason
    assert reply.json()["error"]


def test_a_chunked_body_over_the_cap_is_refused_too(tiny: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": {"x": [['
        for _ in range(MAX_BODY // 1000 + 1):
            yield b"1.0, " * 200
        yield b"1.0]]}}"

    reply = httpx.post(tiny + "/predict", content=chunks())
    assert reply.status_code == 413
    assert reply.json()["reason"] == "too_large"


def test_metadata_and_probes(tiny: str) -> None:
    meta = httpx.get(tiny + "/metadata").json()
    assert meta["model"] == {"name": "tiny", "version": 1}
    assert meta["inputs"][0]["name"] == "x"
    assert meta["signed_by"]
    for probe in ("/livez", "/readyz"):
        assert httpx.get(tiny + probe).status_code == 200


def test_64_concurrent_clients_all_get_their_own_answers(
    tiny: str, signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    from modelpack import Predictor

    rng = np.random.default_rng(5)
    rows = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(256)]

    def ask(row: np.ndarray) -> tuple[int, list[float]]:
        """As a client does: a 503 (admission control refuses what would wait past its
        deadline, by design, and a busy machine makes that happen) is asked again after its
        Retry-After; every request gets its answer in the end."""
        deadline = time.monotonic() + 120
        while True:
            reply = httpx.post(tiny + "/predict", json={"inputs": {"x": row.tolist()}}, timeout=30)
            if reply.status_code == 503 and time.monotonic() < deadline:
                time.sleep(float(reply.headers["retry-after"]))
                continue
            assert reply.status_code == 200, reply.text
            return reply.status_code, reply.json()["outputs"]["logits"][0]

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, rows))
    assert {status for status, _ in answers} == {200}
    direct = Predictor.from_pack(load_pack(signed_pack, [keys[1]]))
    for row, (_, logits) in zip(rows, answers, strict=True):
        np.testing.assert_allclose(
            logits, direct.run({"x": row})["logits"][0], rtol=1e-5, atol=1e-5
        )


def test_metrics_have_ours_and_bentomls_and_pass_promtool(tiny: str) -> None:
    httpx.post(tiny + "/predict", json={"inputs": {"x": [[0.0] * 8]}})
    httpx.post(tiny + "/predict", content=b"{bad")
    text = httpx.get(tiny + "/metrics").text
    for name in (
        "edgebento_inference_seconds_bucket",
        'edgebento_requests_total{outcome="ok"}',
        'edgebento_requests_total{outcome="rejected"}',
        'edgebento_input_rejected_total{reason="invalid_json"}',
        'edgebento_model_info{name="tiny"',
        "bentoml_service_request_total",
    ):
        assert name in text, name
    # The core's paths take the fast lane past BentoML's middleware: counted once, by the core.
    assert 'endpoint="/predict"' not in text
    assert_promtool_passes(text)


def test_sequences_of_any_length_are_batched_and_cut_back(
    servers: dict[str, Server], tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from modelpack import Predictor

    url = servers["seq"].url
    pack = load_pack(sequence_pack(tmp_path / "seq", keys[0]), [keys[1]])
    direct = Predictor.from_pack(pack)
    feeds = [tokens(n, seed) for seed, n in enumerate(np.random.default_rng(1).integers(1, 40, 96))]

    def ask(feed: dict[str, np.ndarray]) -> dict:
        payload = {"inputs": {k: v.tolist() for k, v in feed.items()}}
        reply = httpx.post(url + "/predict", json=payload, timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()["outputs"]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, feeds))
    for feed, answer in zip(feeds, answers, strict=True):
        alone = direct.run(feed)
        assert np.asarray(answer["hidden"]).shape == (1, feed["input_ids"].shape[1], 4)
        np.testing.assert_allclose(answer["hidden"], alone["hidden"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(answer["pooled"], alone["pooled"], rtol=1e-5, atol=1e-6)
    mismatch = {"inputs": {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}}
    reply = httpx.post(url + "/predict", json=mismatch)
    assert reply.status_code == 400 and reply.json()["reason"] == "shape"


def test_pathological_inputs_never_get_a_500(tiny: str) -> None:
    overflow = httpx.post(
        tiny + "/predict", content=b'{"inputs": {"x": [[1e999, 0, 0, 0, 0, 0, 0, 0]]}}'
    )
    # 1e999 is no float32 (it would become infinity): refused, naming the input.
    assert overflow.status_code == 400 and overflow.json()["reason"] == "dtype"
    assert "'x'" in overflow.json()["error"]
    deep = httpx.post(tiny + "/predict", content=b"[" * 3000)
    assert deep.status_code == 400 and deep.json()["reason"] == "invalid_json"
    assert httpx.get(tiny + "/predict").status_code == 405


def test_the_fast_lane_gives_way_to_bentomls_cors(tiny: str, tiny_with_cors: str) -> None:
    """With BentoML's CORS on, a browser's preflight and its POST to /predict get CORS headers
    (the core's paths then go through BentoML's middleware); without it, the fast lane answers."""
    origin = {"origin": "https://app.example"}
    preflight = httpx.options(
        tiny_with_cors + "/predict",
        headers={**origin, "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    body = {"inputs": {"x": [[0.0] * 8]}}
    answer = httpx.post(tiny_with_cors + "/predict", json=body, headers=origin)
    assert answer.status_code == 200 and "logits" in answer.json()["outputs"]
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    plain = httpx.post(tiny + "/predict", json=body, headers=origin)
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
