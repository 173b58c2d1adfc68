"""The README's five-minute tour, run as written, from a folder of the user's own.

The commands are read from README.md's code blocks, so the README stays true: only hosts, ports
and paths are changed (the broker, the bucket, the device's data directory, the ports), and a
line that ends in ``&`` runs in the background, as it would in the user's shell. What the user
brings is made first: a Keras model trained on scikit-learn's digits (and a second version of
it), and ``.npz`` files of its input ``x`` with ``labels``.

Real components only: `bentoml serve` from outside the checkout, moto's S3 server through boto3,
Mosquitto, the agent as its own process, `mosquitto_rr` as the client, and devices answering
with traffic while a rollout judges their health.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.agent import Client, wait_online
from tests.support.services import LOOPBACK, Mosquitto, MotoS3, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEVICE = "cam-17"

# The Keras the user's model is saved with.
KERAS = "keras"  # Keras 3, as `pip install keras` gives today
# What the user brings: a Keras model and a second version of it, and their data.
USER_FILES = r"""

import numpy as np
from sklearn.datasets import load_digits

import {keras} as keras

digits = load_digits()
x = (digits.data / 16.0).astype(np.float32)
y = digits.target.astype(np.int64)
order = np.random.default_rng(0).permutation(len(x))
x, y = x[order], y[order]
np.savez("train.npz", x=x[:1000], labels=y[:1000])
np.savez("calib.npz", x=x[1000:1400], labels=y[1000:1400])
for name, seed in (("model.keras", 0), ("model-v2.keras", 1)):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.layers.Input((64,), name="x"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax", name="probs"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x[:1000], y[:1000], epochs=15, batch_size=64, verbose=0)
    model.save(name)
"""


def tour_commands(readme: str) -> list[str]:
    """Every command of the tour's ``bash`` blocks, continuation lines joined, comments cut."""
    section = readme.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = _without_comment(line).strip()
            if line:
                commands.append(" ".join(line.split(" ")))
    return commands


def _without_comment(line: str) -> str:
    """The line up to a ``#`` that starts a shell comment (outside quotes, after a space)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


@dataclass
class Tour:
    """Runs the tour's commands in the user's folder, with the bench's hosts, ports and paths."""

    folder: Path
    env: dict[str, str]
    replacements: dict[str, str]
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)

    def substitute(self, command: str) -> str:
        for old, new in self.replacements.items():
            command = command.replace(old, new)
        return command

    def run(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", "-c", self.substitute(command)],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stderr[-3000:]}"
        return done

    def start(self, command: str) -> Path:
        """A ``... &`` line: its own process group, so it stops whole (bentoml's workers too)."""
        line = self.substitute(command.removesuffix("&").strip())
        log = self.folder.parent / f"bg-{len(self.background)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", line],
                cwd=self.folder,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.background.append(process)
        self.logs[command.split()[0] if "=" not in command.split()[0] else command.split()[1]] = log
        return log

    def stop(self) -> None:
        for process in reversed(self.background):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.background:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def tour(
    tmp_path: Path, own_broker: Mosquitto, s3_server: MotoS3, s3_bucket: str
) -> Iterator[Tour]:
    folder = tmp_path / "user"  # the user's own folder: not the checkout, no bentofile.yaml
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGEBENTO_MODEL")}
    serve_port = free_port()
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        BENTOML_HOME=str(tmp_path / "bentoml"),
        BENTOML_PORT=str(serve_port),  # `bentoml serve`'s own variable for its port
        BENTOML_HOST=LOOPBACK,
        AWS_ENDPOINT_URL=s3_server.endpoint_url,
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    broker = f"{LOOPBACK}:{own_broker.port}"
    replacements = {
        "localhost:3000": f"{LOOPBACK}:{serve_port}",
        "mqtt://broker:1883": f"mqtt://{broker}",
        "-h broker": f"-h {LOOPBACK} -p {own_broker.port}",
        "s3://acme-fleet": f"s3://{s3_bucket}",
        "/var/lib/edgebento": str(tmp_path / "device"),
        "--metrics-port 9108": f"--metrics-port {free_port()}",
    }
    made = subprocess.run(
        [sys.executable, "-c", USER_FILES.replace("{keras}", KERAS)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    session = Tour(folder, env, replacements)
    try:
        yield session
    finally:
        session.stop()


def test_the_readme_tour_runs_as_written(tour: Tour, own_broker: Mosquitto) -> None:
    commands = tour_commands((REPO / "README.md").read_text())
    steps = [_step(c) for c in commands]
    assert steps == [
        "edgebento keygen",
        "edgebento optimize",
        "edgebento pack",
        "edgebento bento",
        "bentoml serve",
        "python -c",
        "curl -s",
        "edgebento publish",
        "edge-agent run",
        "mosquitto_rr deploy",
        "mosquitto_rr infer",
        "edgebento optimize",
        "edgebento publish",
        "edgebento sync",
        "while sleep",
        "edgebento rollout",
        "edgebento rollback",
        "edgebento fleet",
    ], "the tour changed: keep this test walking every step of it"
    client = Client(own_broker)
    seen: dict[str, Any] = {}
    try:
        for command, step in zip(commands, steps, strict=True):
            if command.endswith("&"):
                tour.start(command)
                _wait_ready(tour, step, client)
                continue
            began = time.monotonic()
            done = tour.run(command)
            print(f"{time.monotonic() - began:6.1f} s  {step}", file=sys.stderr)
            seen[step] = _check(step, done, tour, seen)
    finally:
        client.close()


def _step(command: str) -> str:
    words = [w for w in command.split() if "=" not in w or w.startswith("-")]
    if words[0] == "mosquitto_rr":
        return "mosquitto_rr " + ("deploy" if "cmd/deploy" in command else "infer")
    return " ".join(words[:2])


def _check(
    step: str, done: subprocess.CompletedProcess[str], tour: Tour, seen: dict[str, Any]
) -> Any:
    """What the user reads after each step, checked as they would check it."""
    out = done.stdout
    folder = tour.folder
    if step == "edgebento optimize" and "edgebento optimize" not in seen:
        manifest = json.loads((folder / "packs/digits-1/manifest.json").read_text())
        source = hashlib.sha256((folder / "model.keras").read_bytes()).hexdigest()
        assert manifest["parent"] == source  # the model the pack was made from
        assert "chosen:" in out
    elif step == "edgebento pack":
        assert out.startswith("ok: digits v1")
    elif step == "edgebento bento":
        # The hint names the very command the README runs next, from the user's folder.
        assert "serve it: EDGEBENTO_MODEL=digits:v1 bentoml serve bentos.service:" in out
    elif step == "curl -s":
        answer = json.loads(out)
        assert answer["model"] == {"name": "digits", "version": 1}
        assert len(answer["outputs"]["probs"]) == 2
        return answer
    elif step == "edgebento publish":
        assert out.startswith("published digits v"), out
    elif step == "mosquitto_rr deploy":
        reply = json.loads(out)
        assert (reply["ok"], reply["outcome"]) == (True, "installed"), reply
    elif step == "mosquitto_rr infer":
        reply = json.loads(out)
        assert reply["ok"] and reply["model"] == {"name": "digits", "version": 1}, reply
        # The device answers what the cloud answers: one pack, one encoder.
        assert reply["outputs"] == seen["curl -s"]["outputs"]
    elif step == "edgebento rollout":
        # Completed, with the wave's health judged on the device's own traffic.
        assert "completed" in out and "wave 0: verified" in out, out
        assert "NOT VERIFIED" not in out, out
    elif step == "edgebento fleet":
        row = next(line for line in out.splitlines() if DEVICE in line)
        # Back on v1, with nothing pending: the rollback left the desired state consistent.
        assert "online" in row and "digits v1" in row and "->" not in row, out
    elif step == "edgebento rollback":
        reply = json.loads(out)
        assert (reply["ok"], reply["outcome"]) == (True, "rolled_back"), reply
        assert reply["model"] == {"name": "digits", "version": 1}
    return out


def _wait_ready(tour: Tour, step: str, client: Client) -> None:
    deadline = time.monotonic() + 120
    if step == "edge-agent run":
        wait_online(client, "edgebento", DEVICE, timeout=120)  # the same start-up budget
        return
    if step == "while sleep":
        return  # the README's traffic: the rollout waits for its inferences and judges them
    while time.monotonic() < deadline:
        for process in tour.background:
            assert process.poll() is None, _logs(tour)
        if step == "bentoml serve":
            port = tour.env["BENTOML_PORT"]
            try:
                if httpx.get(f"http://{LOOPBACK}:{port}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        elif step == "edgebento sync" and "syncing telemetry" in tour.logs["edgebento"].read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{step} did not get ready:\n{_logs(tour)}")


def _logs(tour: Tour) -> str:
    return "\n".join(f"{name}: {path.read_text()[-2000:]}" for name, path in tour.logs.items())
