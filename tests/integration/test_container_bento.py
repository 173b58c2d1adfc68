"""`bentoml containerize --backend buildah` with the Debian base image, then serve from inside it.

No Docker engine here: buildah builds with chroot isolation on vfs storage, and
``buildah run --network host`` runs the image's own entrypoint; the host asks /predict.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.support.agent import make_pack
from tests.support.containers import (
    container_root,
    processes_rooted_in,
    stop_tree,
    wait_gone,
    working_container,
)
from tests.support.containers import run_checked as _run
from tests.support.services import LOOPBACK, free_port
from tools.container import container_env, setup

pytestmark = [pytest.mark.container, pytest.mark.slow]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def image(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path], mlp_model: Path
) -> Iterator[tuple[str, dict[str, str], Path]]:
    setup()  # idempotent: what `make container-tools` did already
    work = tmp_path_factory.mktemp("container")
    pack = make_pack(work / "tiny", mlp_model, keys[0], version=1)
    env = {**container_env(), "BENTOML_HOME": str(work / "bentoml"), "EDGEBENTO_MODEL": "tiny:v1"}
    # From the user's own folder, as docs/containers.md says: no bentofile.yaml there, so the
    # bento is built by `edgebento bento build` (issue 23: `bentoml build .` works only here).
    user = work / "user"
    user.mkdir()
    edgebento = str(BIN / "edgebento")
    _run([edgebento, "bento", "import", str(pack), "--pub", str(keys[1])], env, cwd=user)
    built = _run([edgebento, "bento", "build", "tiny:v1"], env, cwd=user)
    bento = built.split()[2]  # "built bento edgebento:TAG"
    assert f"containerize it: bentoml containerize {bento}" in built, built
    tag = f"localhost/edgebento-test:{uuid.uuid4().hex[:8]}"
    _run(
        [
            str(BIN / "bentoml"),
            "containerize",
            bento,
            "--backend",
            "buildah",
            "-t",
            tag,
        ],
        env,
        cwd=user,
    )
    try:
        yield tag, env, pack
    finally:
        subprocess.run(["buildah", "rmi", tag], env=env, capture_output=True)


@pytest.fixture(scope="module")
def container(image: tuple[str, dict[str, str], Path]) -> Iterator[tuple[str, Path]]:
    """One working container of the image and its root on the host, for the module: on vfs
    storage each ``buildah from`` copies the whole image."""
    tag, env, _ = image
    with working_container(tag, env) as ctr:
        yield ctr, container_root(ctr, env)


def test_the_image_serves_predict_to_the_host_and_stops_whole(
    image: tuple[str, dict[str, str], Path], container: tuple[str, Path]
) -> None:
    _, env, pack = image
    ctr, root = container
    started = _serve_and_ask(ctr, env, pack, root)
    # Stopping the served container stopped all of it: BentoML's arbiter and its workers.
    assert len(started) >= 2, f"expected bentoml serve and a worker, saw {started}"
    assert wait_gone(started) == []
    assert processes_rooted_in(root) == []


def _serve_and_ask(ctr: str, env: dict[str, str], pack: Path, root: Path) -> list[int]:
    """Serve, ask, stop; returns the pids that ran under ``buildah run`` while it served."""
    from modelpack import read_samples

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
        if server.poll() is not None:
            out = server.stdout.read().decode(errors="replace") if server.stdout else ""
            raise AssertionError(f"the container's bentoml serve exited: {out[-3000:]}")
        samples = read_samples(pack / "samples.npz")
        reply = httpx.post(url + "/predict", json={"inputs": {"x": samples.inputs["x"].tolist()}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == {"name": "tiny", "version": 1}
        np.testing.assert_allclose(
            reply.json()["outputs"]["probs"], samples.outputs["probs"], rtol=1e-5
        )
        bad = httpx.post(url + "/predict", content=b"{")
        assert bad.status_code == 400 and bad.json()["reason"] == "invalid_json"
        started = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
    finally:
        stop_tree(server, root=root)
    return started


def test_the_image_holds_the_serving_set_only(container: tuple[str, Path]) -> None:
    _, root = container  # the image's files, read from the host where buildah mounted them
    (site,) = root.glob("app/.venv/lib/python3*/site-packages")
    listing = {p.name for p in site.iterdir()}
    assert "onnxruntime" in listing and "bentoml" in listing
    assert "tensorflow" not in listing and "torch" not in listing
