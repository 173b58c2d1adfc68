"""The demo's first half: a trained model, the signed packs (v1, v2 and a broken v3), the Lambda
handler, and the BentoML service with an OIP client and a short flood."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edgebento.demo_runner import BIN, Demo, console, post, wait_http
from edgebento.localservices import LOOPBACK, free_port

# The flood: many clients at once against a service whose queue is kept short, so that the
# overflow is refused with 503 (and a Retry-After) instead of waiting or failing.
FLOOD_CLIENTS = 48
FLOOD_SECONDS = 4.0
FLOOD_MAX_SECONDS = 60.0  # on a busy machine the clients may be slower than the model at first
SERVICE_ENV = {
    "EDGEBENTO_WORKERS": "1",
    "EDGEBENTO_MAX_QUEUE": "8",
    "EDGEBENTO_MAX_BATCH": "4",
    "EDGEBENTO_CACHE_BYTES": "1048576",  # the result cache: the same request twice is a hit
}


@dataclass(frozen=True)
class Packs:
    v1: Path
    v2: Path
    v3_broken: Path


@dataclass(frozen=True)
class Request:
    body: bytes
    label: int
    rows: list[list[float]]


def step_model(demo: Demo) -> dict[str, Path]:
    from edgebento.demo_model import digits_splits, train_keras_mlp

    data = digits_splits(demo.workdir / "data")
    model = train_keras_mlp(data["train"], demo.workdir / "model" / "digits.keras")
    demo.note("train", f"Keras MLP on scikit-learn digits -> {model.relative_to(demo.workdir)}")
    return {"model": model, **data}


def step_optimize(demo: Demo, paths: dict[str, Path], keys: Path) -> Packs:
    packs = demo.workdir / "packs"
    v1 = packs / "digits-1"
    demo.run(
        BIN / "edgebento", "optimize", paths["model"], "--out", v1, "--name", "digits",
        "--version", "1", "--data", paths["calib"], "--eval-data", paths["eval"],
        "--train-data", paths["train"], "--key", keys / "signing.key",
    )  # fmt: skip
    report = json.loads((v1 / "report.json").read_text())
    demo.note(
        "optimize",
        f"{report.get('summary', 'chosen: ' + str(report.get('chosen')))}; see {v1 / 'report.html'}",
    )
    # Version 2 of the same model, for the rollout: a new signed pack from the optimized model.
    v2 = _pack(demo, v1, packs / "digits-2", 2, v1 / "samples.npz", keys, paths["calib"])
    # Version 3 is signed and valid, but its golden samples do not match what the model
    # computes: the devices' health check must refuse to serve it.
    broken = _broken_samples(v1 / "samples.npz", demo.workdir / "data" / "broken-golden.npz")
    v3 = _pack(demo, v1, packs / "digits-3-broken", 3, broken, keys)
    demo.run(BIN / "edgebento", "pack", "verify", v1, "--pub", keys / "signing.pub")
    demo.run(BIN / "edgebento", "pack", "inspect", v1)
    return Packs(v1, v2, v3)


def _pack(
    demo: Demo,
    source: Path,
    out: Path,
    version: int,
    samples: Path,
    keys: Path,
    data: Path | None = None,
) -> Path:
    """``data``: record a drift baseline on it (docs/monitoring.md)."""
    baseline: list[str | Path] = ["--data", data] if data is not None else []
    demo.run(
        BIN / "edgebento", "pack", "create", source / "model.onnx", "--name", "digits",
        "--version", str(version), "--out", out, "--samples", samples,
        "--key", keys / "signing.key", *baseline, quiet=True,
    )  # fmt: skip
    return out


def _broken_samples(good: Path, out: Path) -> Path:
    from modelpack import read_samples, write_samples

    samples = read_samples(good)
    write_samples(out, samples.inputs, {k: 1.0 - v for k, v in samples.outputs.items()})
    return out


def digit_request(paths: dict[str, Path]) -> Request:
    import numpy as np

    data = np.load(paths["eval"])
    rows = data["x"][:1].tolist()
    return Request(json.dumps({"inputs": {"x": rows}}).encode(), int(data["labels"][0]), rows)


def _argmax(probs: list[float]) -> int:
    return max(range(len(probs)), key=lambda i: probs[i])


def step_lambda(demo: Demo, pack: Path, keys: Path, request: Request) -> str:
    os.environ["EDGEBENTO_PACK"] = str(pack)
    os.environ["EDGEBENTO_TRUST"] = str(keys / "signing.pub")
    from bentos import lambda_handler

    event = {
        "version": "2.0",
        "routeKey": "POST /predict",
        "rawPath": "/predict",
        "requestContext": {"http": {"method": "POST", "path": "/predict"}},
        "headers": {"content-type": "application/json"},
        "body": request.body.decode(),
        "isBase64Encoded": False,
    }
    console.print(
        "[dim]>>>[/dim] [bold]bentos.lambda_handler.handler(api_gateway_v2_event, None)[/bold]"
    )
    answer = lambda_handler.handler(event, None)
    body = json.loads(answer["body"])
    predicted = _argmax(body["outputs"]["probs"][0])
    return f"HTTP {answer['statusCode']}, predicted {predicted} (label {request.label}) in {body['latency_ms']} ms"


def start_bentoml(demo: Demo, pack: Path, keys: Path) -> str:
    """Import the pack and start ``bentoml serve``; it runs until the demo ends. Its URL."""
    demo.run(BIN / "edgebento", "bento", "import", pack, "--pub", keys / "signing.pub")
    port = free_port()
    os.environ["EDGEBENTO_MODEL"] = "digits:v1"
    settings = " ".join(f"{k}={v}" for k, v in SERVICE_ENV.items())
    console.print(f"[dim]$[/dim] [bold]export EDGEBENTO_MODEL=digits:v1 {settings}[/bold]")
    demo.start(
        "bentoml", BIN / "bentoml", "serve", ".", "--host", LOOPBACK, "--port", str(port),
        env={"EDGEBENTO_MODEL": "digits:v1", **SERVICE_ENV},
    )  # fmt: skip
    url = f"http://{LOOPBACK}:{port}"
    wait_http(f"{url}/readyz", timeout=180)
    return url


def step_predict(url: str, request: Request) -> str:
    status, body = post(f"{url}/predict", request.body)
    post(f"{url}/predict", request.body)  # again: the result cache answers it
    predicted = _argmax(body["outputs"]["probs"][0])
    bad_status, bad = post(f"{url}/predict", b'{"inputs": {"x": [[1, 2, 3]]}}')
    console.print(
        f"bad input -> HTTP {bad_status}: {bad.get('error')} (reason {bad.get('reason')})"
    )
    return (
        f"HTTP {status}, predicted {predicted} (label {request.label}); "
        f"a wrong shape got HTTP {bad_status} ({bad.get('reason')})"
    )


def step_oip(url: str, request: Request) -> str:
    """The Open Inference Protocol v2 with Triton's own client, unchanged."""
    import numpy as np
    import tritonclient.http as triton

    host = url.removeprefix("http://")
    console.print(
        f"[dim]>>>[/dim] [bold]tritonclient.http.InferenceServerClient('{host}')"
        ".infer('digits', [InferInput('x', [1, 64], 'FP32')])[/bold]"
    )
    client = triton.InferenceServerClient(url=host)
    try:
        tensor = triton.InferInput("x", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.asarray(request.rows, dtype=np.float32))
        result = client.infer("digits", [tensor])
        probs = result.as_numpy("probs")
    finally:
        client.close()
    if probs is None:
        raise RuntimeError("the OIP answer has no output 'probs'")
    predicted = int(np.argmax(probs[0]))
    return f"tritonclient infer over OIP v2: predicted {predicted} (label {request.label})"


def step_flood(url: str, request: Request) -> str:
    """A burst of concurrent clients: every answer must be a 200 or a 503, never a 500."""
    import httpx

    console.print(
        f"[dim]flood: {FLOOD_CLIENTS} clients posting /predict for {FLOOD_SECONDS:.0f}s, and on until "
        "the first 503[/dim]"
    )
    start = time.monotonic()
    refused = threading.Event()

    def flooding() -> bool:
        """FLOOD_SECONDS at least, then on until the first 503: a flood is what outruns the
        model, and on a busy machine the clients may take a while to."""
        spent = time.monotonic() - start
        return spent < FLOOD_SECONDS or (not refused.is_set() and spent < FLOOD_MAX_SECONDS)

    def client(seed: int) -> Counter[int | str]:
        import numpy as np

        rng = np.random.default_rng(seed)  # other inputs each time: the cache answers none
        seen: Counter[int | str] = Counter()
        with httpx.Client(timeout=30) as http:
            while flooding():
                body = {"inputs": {"x": rng.random((1, 64)).round(3).tolist()}}
                try:
                    answer = http.post(f"{url}/predict", json=body)
                    seen[answer.status_code] += 1
                    if answer.status_code == 503:
                        refused.set()
                except httpx.HTTPError as exc:
                    seen[type(exc).__name__] += 1
        return seen

    with ThreadPoolExecutor(FLOOD_CLIENTS) as pool:
        counts: Counter[int | str] = sum(pool.map(client, range(FLOOD_CLIENTS)), Counter())
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
    wrong = {k: v for k, v in counts.items() if k not in (200, 503)}
    if wrong:
        raise RuntimeError(f"answers other than 200 and 503: {shown}")
    if not counts[503]:
        raise RuntimeError(f"no 503 under the flood (is the queue bounded?): {shown}")
    return f"{sum(counts.values())} requests: {shown}; no 500"
