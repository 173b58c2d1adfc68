"""The Lambda container image `edgebento deploy lambda` writes, built with buildah and run.

The image is built from the Debian base ``make container-tools`` makes (``--base-image``), since
Docker Hub's ``python:3.11-slim`` is out of reach here. ``buildah run --network host`` starts the
image's own entrypoint (awslambdaric with ``bentos.lambda_handler.handler``), which polls the
Lambda Runtime API on loopback for events, as it would on AWS.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.agent import make_pack
from tests.support.containers import run_checked, stop_tree, working_container
from tests.support.lambda_runtime import LambdaRuntimeApi
from tools.container import BASE_IMAGE, container_env, setup

pytestmark = [pytest.mark.container, pytest.mark.slow]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def lambda_image(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path], mlp_model: Path
) -> Iterator[tuple[str, dict[str, str], Path]]:
    setup()  # idempotent: what `make container-tools` did already
    work = tmp_path_factory.mktemp("lambda-image")
    pack = make_pack(work / "tiny", mlp_model, keys[0], version=1)
    env = container_env()
    context = work / "context"
    deploy = [str(BIN / "edgebento"), "deploy", "lambda", "--pack", str(pack)]
    deploy += ["--pub", str(keys[1]), "--out", str(context), "--base-image", BASE_IMAGE]
    run_checked(deploy, env)
    tag = f"localhost/edgebento-lambda-test:{uuid.uuid4().hex[:8]}"
    run_checked(["buildah", "bud", "--isolation", "chroot", "-t", tag, str(context)], env)
    try:
        yield tag, env, pack
    finally:
        subprocess.run(["buildah", "rmi", tag], env=env, capture_output=True)


@pytest.fixture(scope="module")
def container(lambda_image: tuple[str, dict[str, str], Path]) -> Iterator[str]:
    """One working container of the image for the module: on vfs storage each ``buildah
    from`` copies the whole image."""
    tag, env, _ = lambda_image
    with working_container(tag, env) as ctr:
        yield ctr


@pytest.fixture
def runtime(
    lambda_image: tuple[str, dict[str, str], Path], container: str
) -> Iterator[LambdaRuntimeApi]:
    """The image's entrypoint running, polling a Runtime API for events."""
    tag, env, _ = lambda_image
    config = json.loads(run_checked(["buildah", "inspect", "--type", "image", tag], env))
    entrypoint = config["OCIv1"]["config"]
    api = LambdaRuntimeApi()
    command = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
    command += ["--workingdir", "/var/task", "--env", f"AWS_LAMBDA_RUNTIME_API={api.address}"]
    # Nothing written beside the code, as on AWS's read-only /var/task: the container stays
    # the image, whose compiled code the other test counts.
    command += ["--env", "PYTHONDONTWRITEBYTECODE=1"]
    command += [container, "--", *entrypoint["Entrypoint"], *entrypoint["Cmd"]]
    function = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        yield api
    finally:
        stop_tree(function)
        api.close()


def _samples(pack: Path) -> tuple[dict, np.ndarray]:
    from modelpack import read_samples

    samples = read_samples(pack / "samples.npz")
    return {"inputs": {"x": samples.inputs["x"].tolist()}}, samples.outputs["probs"]


def _http_api_v2(body: bytes) -> dict:
    return {
        "version": "2.0",
        "routeKey": "POST /predict",
        "rawPath": "/predict",
        "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": "/predict"}},
        "body": base64.b64encode(body).decode(),
        "isBase64Encoded": True,
    }


def test_the_image_answers_lambda_invocations(
    lambda_image: tuple[str, dict[str, str], Path], runtime: LambdaRuntimeApi
) -> None:
    request, expected = _samples(lambda_image[2])

    kind, answer = runtime.invoke(request)
    assert kind == "response", answer
    assert answer["model"] == {"name": "tiny", "version": 1}
    np.testing.assert_allclose(answer["outputs"]["probs"], expected, rtol=1e-5)

    kind, answer = runtime.invoke(_http_api_v2(json.dumps(request).encode()))
    assert kind == "response" and answer["statusCode"] == 200, answer
    np.testing.assert_allclose(json.loads(answer["body"])["outputs"]["probs"], expected, rtol=1e-5)

    kind, answer = runtime.invoke(_http_api_v2(b"{"))
    assert kind == "response" and answer["statusCode"] == 400, answer
    assert json.loads(answer["body"])["reason"] == "invalid_json"


def test_the_lambda_image_holds_no_bentoml_and_compiled_code(
    lambda_image: tuple[str, dict[str, str], Path], container: str
) -> None:
    _, env, _ = lambda_image
    script = (
        "import importlib.util as u, pathlib as p; "
        "print([m for m in ('awslambdaric', 'onnxruntime', 'bentoml', 'tensorflow', 'onnx') "
        "if u.find_spec(m)]); "
        "print(len(list(p.Path('/var/task/bentos/__pycache__').glob('*.pyc'))))"
    )
    out = run_checked(
        ["buildah", "run", "--isolation", "chroot", container, "--", "python", "-c", script], env
    )
    found, compiled = out.strip().splitlines()
    assert found == "['awslambdaric', 'onnxruntime']"
    assert int(compiled) > 0
