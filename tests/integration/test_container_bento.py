"""`bentoml containerize --backend buildah` with the Debian base image, then serve from inside it.

No Docker engine here: buildah builds with chroot isolation on vfs storage, and
``buildah run --network host`` runs the image's own entrypoint; the host asks /predict.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bentos.container import container_env, setup
from tests.support.services import LOOPBACK, free_port

pytestmark = [pytest.mark.container, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd[:3])}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def image(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path], mlp_model: Path
) -> Iterator[tuple[str, dict[str, str], Path]]:
    from modelpack import Samples, create_pack
    from tests.support import models

    setup()  # idempotent: what `make container-tools` did already
    work = tmp_path_factory.mktemp("container")
    pack = work / "tiny"
    inputs, outputs = models.golden_samples(mlp_model)
    create_pack(
        mlp_model, pack, name="tiny", version=1, samples=Samples(inputs, outputs), key=keys[0]
    )
    env = {**container_env(), "BENTOML_HOME": str(work / "bentoml"), "EDGEBENTO_MODEL": "tiny:v1"}
    _run([str(BIN / "edgebento"), "bento", "import", str(pack), "--pub", str(keys[1])], env)
    _run([str(BIN / "bentoml"), "build", "."], env)
    tag = f"localhost/edgebento-test:{uuid.uuid4().hex[:8]}"
    _run(
        [
            str(BIN / "bentoml"),
            "containerize",
            "edgebento:latest",
            "--backend",
            "buildah",
            "-t",
            tag,
        ],
        env,
    )
    try:
        yield tag, env, pack
    finally:
        subprocess.run(["buildah", "rmi", tag], env=env, capture_output=True)


def test_the_image_serves_predict_to_the_host(image: tuple[str, dict[str, str], Path]) -> None:
    from modelpack import read_samples

    tag, env, pack = image
    ctr = _run(["buildah", "from", tag], env).strip()
    port = free_port()
    server = subprocess.Popen(
        [
            "buildah",
            "run",
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--workingdir",
            "/home/bentoml/bento",
            "--env",
            "EDGEBENTO_MODEL=tiny:v1",
            ctr,
            "--",
            "/home/bentoml/bento/env/docker/entrypoint.sh",
            "bentoml",
            "serve",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://{LOOPBACK}:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        samples = read_samples(pack / "samples.npz")
        reply = httpx.post(url + "/predict", json={"inputs": {"x": samples.inputs["x"].tolist()}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == {"name": "tiny", "version": 1}
        np.testing.assert_allclose(
            reply.json()["outputs"]["probs"], samples.outputs["probs"], rtol=1e-5
        )
        bad = httpx.post(url + "/predict", content=b"{")
        assert bad.status_code == 400 and bad.json()["reason"] == "invalid_json"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        subprocess.run(["buildah", "rm", ctr], env=env, capture_output=True)


def test_the_image_holds_the_serving_set_only(image: tuple[str, dict[str, str], Path]) -> None:
    tag, env, _ = image
    ctr = _run(["buildah", "from", tag], env).strip()
    try:
        listing = _run(
            [
                "buildah",
                "run",
                "--isolation",
                "chroot",
                ctr,
                "--",
                "sh",
                "-c",
                "ls /app/.venv/lib/python3*/site-packages",
            ],
            env,
        )
    finally:
        subprocess.run(["buildah", "rm", ctr], env=env, capture_output=True)
    assert "onnxruntime" in listing and "bentoml" in listing
    assert "tensorflow" not in listing and "torch" not in listing
