"""``edgebento demo``: the whole path on this machine, step by step, with the commands a user types.

A Keras model is trained on scikit-learn's digits, optimized into a signed pack, invoked
Lambda-style, served by BentoML, published to a registry, run on two edge agents over a real
Mosquitto, rolled out as version 2 and its telemetry synced into the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgebento.localservices import LOOPBACK, Mosquitto, free_port

console = Console()
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class Demo:
    workdir: Path
    results: list[tuple[str, str]] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # --- running things -----------------------------------------------------------------------

    def run(
        self, *args: str | Path, quiet: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(a) for a in args]
        console.print(f"[dim]$[/dim] [bold]{shlex.join(_short(argv))}[/bold]")
        done = subprocess.run(argv, capture_output=quiet, text=True, cwd=REPO, env=self.env)
        if check and done.returncode != 0:
            if quiet:
                console.print(done.stdout + done.stderr)
            raise SystemExit(f"demo step failed: {shlex.join(_short(argv))}")
        return done

    def start(self, name: str, *args: str | Path) -> subprocess.Popen[bytes]:
        argv = [str(a) for a in args]
        console.print(f"[dim]$[/dim] [bold]{shlex.join(_short(argv))} &[/bold]")
        log = (self.workdir / "logs" / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env)
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
            if proc.poll() is None:
                proc.kill()

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BENTOML_HOME=str(self.workdir / "bentoml"),
            BENTOML_DO_NOT_TRACK="true",
            TF_CPP_MIN_LOG_LEVEL="3",
            PATH=f"{BIN}:{env.get('PATH', '')}",
        )
        return env

    def note(self, step: str, outcome: str) -> None:
        self.results.append((step, outcome))
        console.print(f"[green]✓[/green] {step}: {outcome}")


def _short(argv: Sequence[str]) -> list[str]:
    """Show commands the way a user types them (no venv paths)."""
    out = []
    for a in argv:
        if a.startswith(str(BIN) + "/"):
            a = a[len(str(BIN)) + 1 :]
        out.append(a.replace(str(REPO) + "/", ""))
    return out


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


@contextlib.contextmanager
def _section(title: str) -> Iterator[None]:
    console.rule(f"[bold cyan]{title}")
    start = time.perf_counter()
    yield
    console.print(f"[dim]({time.perf_counter() - start:.1f}s)[/dim]")


# --- the steps ------------------------------------------------------------------------------


def step_model(demo: Demo) -> dict[str, Path]:
    from edgebento.demo_model import digits_splits, train_keras_mlp

    data = digits_splits(demo.workdir / "data")
    model = train_keras_mlp(data["train"], demo.workdir / "model" / "digits.keras")
    demo.note("train", f"Keras MLP on scikit-learn digits -> {model.relative_to(demo.workdir)}")
    return {"model": model, **data}


def step_optimize(demo: Demo, paths: dict[str, Path], keys: Path) -> tuple[Path, Path]:
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
    v2 = packs / "digits-2"
    demo.run(
        BIN / "edgebento", "pack", "create", v1 / "model.onnx", "--name", "digits", "--version", "2",
        "--out", v2, "--samples", v1 / "samples.npz", "--key", keys / "signing.key", quiet=True,
    )  # fmt: skip
    demo.run(BIN / "edgebento", "pack", "verify", v1, "--pub", keys / "signing.pub")
    demo.run(BIN / "edgebento", "pack", "inspect", v1)
    return v1, v2


def _digit_request(paths: dict[str, Path]) -> tuple[bytes, int]:
    import numpy as np

    data = np.load(paths["eval"])
    return json.dumps({"inputs": {"x": data["x"][:1].tolist()}}).encode(), int(data["labels"][0])


def step_lambda(demo: Demo, pack: Path, keys: Path, request: bytes, label: int) -> None:
    os.environ["EDGEBENTO_PACK"] = str(pack)
    os.environ["EDGEBENTO_TRUST"] = str(keys / "signing.pub")
    from bentos import lambda_handler

    event = {
        "version": "2.0",
        "routeKey": "POST /predict",
        "rawPath": "/predict",
        "requestContext": {"http": {"method": "POST", "path": "/predict"}},
        "headers": {"content-type": "application/json"},
        "body": request.decode(),
        "isBase64Encoded": False,
    }
    console.print(
        "[dim]>>>[/dim] [bold]bentos.lambda_handler.handler(api_gateway_v2_event, None)[/bold]"
    )
    answer = lambda_handler.handler(event, None)
    body = json.loads(answer["body"])
    predicted = max(range(10), key=lambda i: body["outputs"]["probs"][0][i])
    demo.note(
        "lambda",
        f"HTTP {answer['statusCode']}, predicted {predicted} (label {label}) in {body['latency_ms']} ms",
    )


def step_bentoml(demo: Demo, pack: Path, keys: Path, request: bytes, label: int) -> None:
    demo.run(BIN / "edgebento", "bento", "import", pack, "--pub", keys / "signing.pub")
    port = free_port()
    env_model = "digits:v1"
    os.environ["EDGEBENTO_MODEL"] = env_model
    console.print(f"[dim]$[/dim] [bold]export EDGEBENTO_MODEL={env_model}[/bold]")
    demo.start("bentoml", BIN / "bentoml", "serve", ".", "--host", LOOPBACK, "--port", str(port))
    _wait_http(f"http://{LOOPBACK}:{port}/readyz", timeout=180)
    status, body = _post(f"http://{LOOPBACK}:{port}/predict", request)
    predicted = max(range(10), key=lambda i: body["outputs"]["probs"][0][i])
    bad_status, bad = _post(f"http://{LOOPBACK}:{port}/predict", b'{"inputs": {"x": [[1, 2, 3]]}}')
    console.print(f"bad input -> HTTP {bad_status}: {bad.get('error')}")
    demo.note(
        "bentoml",
        f"HTTP {status}, predicted {predicted} (label {label}); a wrong shape got HTTP {bad_status}",
    )
    demo.processes[-1].terminate()


def step_fleet(demo: Demo, v1: Path, v2: Path, keys: Path, request: bytes, label: int) -> None:
    broker = Mosquitto(workdir=demo.workdir / "mosquitto").start()
    try:
        url = broker.url
        store = demo.workdir / "store"
        console.print(f"Mosquitto listens on {url}; the registry and telemetry live in {store}")
        for pack in (v1, v2):
            demo.run(
                BIN / "edgebento", "publish", pack, "--store", store, "--key", keys / "signing.key"
            )
        demo.run(BIN / "edgebento", "registry", "list", "--store", store)
        demo.start("sync", BIN / "edgebento", "sync", "--broker", url, "--store", store)
        devices = ["dev-1", "dev-2"]
        for device in devices:
            demo.start(
                device, BIN / "edge-agent", "run", "--device", device, "--broker", url,
                "--data-dir", demo.workdir / "devices" / device, "--trust", keys / "signing.pub",
                "--store", store, "--pack", v1, "--telemetry-interval", "2",
            )  # fmt: skip
        _wait_online(broker, devices)
        infer = json.loads(request)
        infer["id"] = "demo-1"
        answer = demo.run(
            "mosquitto_rr", "-h", LOOPBACK, "-p", str(broker.port), "-t", "edgebento/dev-1/infer",
            "-e", "demo/replies/dev-1", "-m", json.dumps(infer), "-W", "20", quiet=True,
        )  # fmt: skip
        reply = json.loads(answer.stdout)
        predicted = max(range(10), key=lambda i: reply["outputs"]["probs"][0][i])
        demo.note(
            "edge inference",
            f"dev-1 answered over MQTT: {predicted} (label {label}) in {reply['latency_ms']} ms",
        )
        demo.run(
            BIN / "edgebento", "rollout", "digits", "2", "--store", store, "--broker", url,
            "--devices", ",".join(devices), "--canary", "50", "--waves", "1", "--bake", "3",
            "--wave-timeout", "60", "--key", keys / "signing.key", "--wait", "--timeout", "180",
        )  # fmt: skip
        demo.note("rollout", "digits v2 is running on dev-1 and dev-2")
        traffic = _send_traffic(broker, devices, infer, seconds=8, rate=50)
        time.sleep(4)  # two heartbeats into the traffic, so fleet status shows it
        demo.run(BIN / "edgebento", "fleet", "status", "--broker", url, "--listen", "3")
        traffic.join()
        time.sleep(2)  # the last heartbeat reaches the store
        parts = (
            sorted((store / "telemetry").rglob("*.jsonl.gz"))
            if (store / "telemetry").exists()
            else []
        )
        demo.note("telemetry", f"{len(parts)} gzipped JSON Lines objects in {store / 'telemetry'}")
    finally:
        demo.stop_all()
        broker.stop()


def _send_traffic(
    broker: Mosquitto, devices: Sequence[str], request: dict[str, Any], seconds: float, rate: int
) -> threading.Thread:
    """Inference traffic over MQTT in the background, ``rate`` requests/s per device, one JSON
    request per line into ``mosquitto_pub -l``, as a sensor gateway would send it."""
    pubs = []
    for device in devices:
        argv = [
            "mosquitto_pub",
            "-h",
            LOOPBACK,
            "-p",
            str(broker.port),
            "-q",
            "1",
            "-t",
            f"edgebento/{device}/infer",
            "-l",
        ]
        console.print(
            f"[dim]$[/dim] [bold]{shlex.join(argv)}[/bold] [dim]< {rate} requests/s for {seconds:.0f}s &[/dim]"
        )
        pubs.append((device, subprocess.Popen(argv, stdin=subprocess.PIPE, text=True)))

    def feed() -> None:
        for i in range(int(seconds * rate)):
            for device, pub in pubs:
                line = {**request, "id": f"load-{i}", "reply_to": f"demo/replies/{device}"}
                pub.stdin.write(json.dumps(line) + "\n")  # type: ignore[union-attr]
                pub.stdin.flush()  # type: ignore[union-attr]
            time.sleep(1 / rate)
        for _, pub in pubs:
            pub.stdin.close()  # type: ignore[union-attr]
            pub.wait(timeout=30)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def _wait_online(broker: Mosquitto, devices: Sequence[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(devices)
    while pending and time.monotonic() < deadline:
        for device in sorted(pending):
            got = subprocess.run(
                [
                    "mosquitto_sub",
                    "-h",
                    LOOPBACK,
                    "-p",
                    str(broker.port),
                    "-t",
                    f"edgebento/{device}/status",
                    "-C",
                    "1",
                    "-W",
                    "2",
                ],
                capture_output=True,
                text=True,
            )
            if got.returncode == 0 and '"online"' in got.stdout:
                pending.discard(device)
        time.sleep(0.5)
    if pending:
        raise SystemExit(f"devices did not come online: {', '.join(sorted(pending))}")


def run_demo(workdir: Path) -> int:
    workdir = workdir.resolve()
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True)
    demo = Demo(workdir)
    keys = workdir / "keys"
    try:
        with _section("1. keys"):
            demo.run(BIN / "edgebento", "keygen", "--out", keys)
        with _section("2. a trained model"):
            paths = step_model(demo)
        with _section("3. optimize into a signed ModelPack"):
            v1, v2 = step_optimize(demo, paths, keys)
        request, label = _digit_request(paths)
        with _section("4. serverless: the Lambda handler"):
            step_lambda(demo, v1, keys, request, label)
        with _section("5. cloud: BentoML"):
            step_bentoml(demo, v1, keys, request, label)
        with _section("6. edge: two agents, a registry, a rollout, telemetry"):
            step_fleet(demo, v1, v2, keys, request, label)
    finally:
        demo.stop_all()
    table = Table(title="edgebento demo: one pack, three targets")
    table.add_column("step", style="bold")
    table.add_column("outcome")
    for step, outcome in demo.results:
        table.add_row(step, outcome)
    console.print(table)
    console.print(
        f"Everything is in {workdir}; logs in {workdir / 'logs'}; the optimization report is {v1 / 'report.html'}"
    )
    return 0
