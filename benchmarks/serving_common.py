"""Shared pieces of the serving benchmarks: wrk as the load generator, servers in subprocesses,
and the baselines: the seed's pattern (a Flask app whose /api/predict calls onnxruntime per
request, on Flask's own threaded server), the plain BentoML service a user writes without
edgebento (``benchmarks/plain_bento``) and a bare ASGI app on uvicorn (``benchmarks/bare_asgi``,
the ceiling of Python HTTP serving on the machine).

Everything listens on 127.0.0.1 only. wrk comes from Debian (installed with apt-get if absent).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.pinning import Pinning
from edgebento.localports import LOOPBACK, free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

FLASK_APP = """
import os, sys
import numpy as np, onnxruntime as ort
from flask import Flask, jsonify, request

options = ort.SessionOptions()
if os.environ.get("BASELINE_THREADS"):  # else ONNX Runtime's default: a thread per core
    options.intra_op_num_threads = options.inter_op_num_threads = int(os.environ["BASELINE_THREADS"])
session = ort.InferenceSession(
    os.environ["BASELINE_MODEL"], options, providers=["CPUExecutionProvider"]
)
types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
dtypes = {i.name: types[i.type] for i in session.get_inputs()}
app = Flask(__name__)

@app.route("/api/predict", methods=["POST"])
def predict():
    data = request.get_json()
    feed = {k: np.asarray(v, dtype=dtypes[k]) for k, v in data["inputs"].items()}
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feed)
    return jsonify({"outputs": {n: o.tolist() for n, o in zip(names, outputs)}})

@app.route("/ping")
def ping():
    return "ok"

if __name__ == "__main__":
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
"""

WRK_SCRIPT = """
local bodies = {%s}
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  return wrk.format(nil, "%s", nil, bodies[(counter %% #bodies) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "non2xx": %%d, "errors": %%d, "p50_us": %%d, "p99_us": %%d, "mean_us": %%f}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env)
    return shutil.which("wrk") or "/usr/bin/wrk"


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    generator_cpu_s: float = 0.0  # wrk's own CPU (user + system) while it ran

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests_per_s": round(self.rps, 1),
            "requests": self.requests,
            "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors,
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "generator_cpu_us_per_request": round(1e6 * self.generator_cpu_s / self.requests, 1)
            if self.requests
            else None,
        }


def wrk(
    url: str, bodies: Sequence[bytes], connections: int, seconds: float, threads: int = 2
) -> LoadResult:
    """POST the bodies round-robin with ``connections`` concurrent clients for ``seconds``."""
    from urllib.parse import urlparse

    path = urlparse(url).path or "/"
    literals = ",".join("[==[" + b.decode() + "]==]" for b in bodies)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (literals, path))
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        out = subprocess.run(
            [
                ensure_wrk(),
                f"-t{min(threads, connections)}",
                f"-c{connections}",
                f"-d{max(int(seconds), 1)}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(script.name)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    data = json.loads(line.removeprefix("WRKJSON "))
    return LoadResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        non_2xx=data["non2xx"],
        socket_errors=data["errors"],
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        generator_cpu_s=cpu,
    )


@dataclass
class Process:
    """A server in its own session, stopped with its whole process group."""

    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def wait_ready(self, path: str, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-1500:]}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.url} not ready: {self.log.read_text()[-1500:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def start(
    cmd: list[str],
    env: dict[str, str],
    port: int,
    log: Path,
    repo: Path = REPO,
    pinning: Pinning | None = None,
) -> Process:
    """``cmd`` in its own session; on ``pinning``'s server CPUs (it and all it starts)."""
    popen = subprocess.Popen(
        cmd,
        cwd=repo,
        env={**os.environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=None if pinning is None else pinning.server_preexec(),
    )
    return Process(popen, f"http://{LOOPBACK}:{port}", log)


def start_flask(
    model: Path, workdir: Path, pinning: Pinning | None = None, threads: int | None = None
) -> Process:
    """The seed's Flask app; ``threads``: ONNX Runtime's, else its default (a thread per core,
    each pinned by ONNX Runtime to a core of its choosing, past the process's CPUs)."""
    app = workdir / "flask_baseline.py"
    app.write_text(FLASK_APP)
    port = free_port()
    proc = start(
        [sys.executable, str(app), str(port)],
        {"BASELINE_MODEL": str(model), "BASELINE_THREADS": str(threads or "")},
        port,
        workdir / "flask.log",
        pinning=pinning,
    )
    proc.wait_ready("/ping")
    return proc


def start_plain_bento(
    model: Path, workdir: Path, workers: int, pinning: Pinning | None = None
) -> Process:
    """``bentoml serve`` of the plain service in ``benchmarks/plain_bento``: POST /predict."""
    port = free_port()
    proc = start(
        [
            str(BIN / "bentoml"),
            "serve",
            "service:PlainOnnx",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
        ],
        {
            "BASELINE_MODEL": str(model),
            "BASELINE_WORKERS": str(workers),
            "BENTOML_HOME": str(workdir / "bentoml-plain"),
            "BENTOML_DO_NOT_TRACK": "true",
        },
        port,
        workdir / f"plain-bento-{port}.log",
        Path(__file__).parent / "plain_bento",
        pinning,
    )
    proc.wait_ready("/readyz")
    return proc


def start_bare_asgi(
    model: Path, workdir: Path, workers: int, pinning: Pinning | None = None
) -> Process:
    """uvicorn (uvloop, httptools) with ``benchmarks.bare_asgi:app``: POST any path."""
    port = free_port()
    proc = start(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.bare_asgi:app",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        {"BASELINE_MODEL": str(model)},
        port,
        workdir / f"bare-asgi-{port}.log",
        pinning=pinning,
    )
    proc.wait_ready("/ping")
    return proc


def start_bento(
    home: Path,
    model_tag: str,
    workdir: Path,
    repo: Path = REPO,
    pinning: Pinning | None = None,
    **env: str,
) -> Process:
    """``bentoml serve`` of ``repo``'s service (another checkout's: a baseline measured beside
    this tree's in one run, its code first on the path); with ``pinning``, one worker per
    server CPU, each with one ONNX Runtime thread, unless ``env`` says otherwise."""
    if pinning is not None:
        env = {"EDGEBENTO_WORKERS": str(pinning.workers), "EDGEBENTO_THREADS": "1", **env}
    port = free_port()
    if repo != REPO:
        env = {"PYTHONPATH": str(repo), **env}
    proc = start(
        [str(BIN / "bentoml"), "serve", ".", "--host", LOOPBACK, "--port", str(port)],
        {
            "BENTOML_HOME": str(home),
            "EDGEBENTO_MODEL": model_tag,
            "BENTOML_DO_NOT_TRACK": "true",
            **env,
        },
        port,
        workdir / f"bento-{model_tag.replace(':', '-')}-{port}.log",
        repo,
        pinning,
    )
    proc.wait_ready("/readyz")
    return proc


def import_to_store(pack: Path, pub: Path, home: Path) -> str:
    out = subprocess.run(
        [str(BIN / "edgebento"), "bento", "import", str(pack), "--pub", str(pub)],
        env={**os.environ, "BENTOML_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()[1]  # "stored NAME:vN in ..."


def row_cost_model(path: Path, width: int = 128, layers: int = 4, seed: int = 0) -> Path:
    """x[batch, width] to y[batch, width] whose cost grows with its rows and nothing else: each
    row becomes its own ``width`` x ``width`` matrix (an outer product) that goes through
    ``layers`` MatMul+Tanh, so a batch of 64 rows costs 64 rows (batching saves no compute;
    it is what the deadline arithmetic must plan for)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from tests.support.serving_models import _save

    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axis2"], ["col"]),
        helper.make_node("Unsqueeze", ["x", "axis1"], ["row"]),
        helper.make_node("Mul", ["col", "row"], ["h0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{layers}"], ["y"], axes=[2], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "row_cost",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    return _save(graph, path)
