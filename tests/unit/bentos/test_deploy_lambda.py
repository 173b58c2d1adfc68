from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgebento.cli import main


def _deploy(pack: Path, pub: Path, out: Path) -> int:
    return main(["deploy", "lambda", "--pack", str(pack), "--pub", str(pub), "--out", str(out)])


def _cfn_lint() -> str:
    return str(Path(sys.executable).with_name("cfn-lint"))


def test_the_cli_writes_a_lambda_image_context_that_cfn_lint_accepts(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "lambda"
    assert _deploy(signed_pack, keys[1], out) == 0
    lint = subprocess.run([_cfn_lint(), str(out / "template.yaml")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    template = yaml.safe_load((out / "template.yaml").read_text())
    function = template["Resources"]["PredictFunction"]
    assert function["Type"] == "AWS::Serverless::Function"
    assert function["Properties"]["PackageType"] == "Image"
    dockerfile = (out / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "awslambdaric"]' in dockerfile
    assert 'CMD ["bentos.lambda_handler.handler"]' in dockerfile
    assert "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}\n" in dockerfile
    assert (out / "pack" / "manifest.sig").exists()
    assert (out / "bentos" / "lambda_handler.py").exists()
    requirements = (out / "requirements.txt").read_text()
    assert "awslambdaric" in requirements
    assert "bentoml" not in requirements and "tensorflow" not in requirements


def test_the_context_serves_the_pack_with_the_handler_it_holds(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "lambda"
    _deploy(signed_pack, keys[1], out)
    code = (
        "import json; from bentos.lambda_handler import handler; "
        "print(json.dumps(handler({'inputs': {'x': [[0.1] * 8]}}, None)['model']))"
    )
    env = {
        "EDGEBENTO_PACK": str(out / "pack"),
        "EDGEBENTO_TRUST": str(out / "trust/signing.pub"),
        "PYTHONPATH": str(out),
    }
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=out, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == '{"name": "tiny", "version": 1}'


def test_a_tampered_pack_is_not_packaged(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    model = signed_pack / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    out = tmp_path / "lambda"
    assert _deploy(signed_pack, keys[1], out) == 1
    assert not (out / "Dockerfile").exists()


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path):
    yield
    shutil.rmtree(tmp_path / "lambda", ignore_errors=True)


def test_the_api_is_behind_iam_by_default_with_a_reserved_concurrency_parameter(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    from bentos.deploy_lambda import LambdaOptions, sam_template

    out = tmp_path / "lambda"
    assert _deploy(signed_pack, keys[1], out) == 0
    template = yaml.safe_load((out / "template.yaml").read_text())
    api = template["Resources"]["PredictApi"]["Properties"]
    assert api["Auth"] == {"EnableIamAuthorizer": True, "DefaultAuthorizer": "AWS_IAM"}
    events = template["Resources"]["PredictFunction"]["Properties"]["Events"]
    assert {e["Properties"]["Path"] for e in events.values()} == {
        "/predict",
        "/metadata",
        "/v2",
        "/v2/{proxy+}",
    }
    assert all(e["Properties"]["ApiId"] == {"Ref": "PredictApi"} for e in events.values())
    assert "/metrics" not in str(events)
    assert template["Parameters"]["ReservedConcurrency"]["Default"] == 10
    reserved = template["Resources"]["PredictFunction"]["Properties"][
        "ReservedConcurrentExecutions"
    ]
    assert reserved["Fn::If"][0] == "HasReservedConcurrency"
    public = sam_template(
        "tiny", 1, LambdaOptions(pack=signed_pack, trust=keys[1], api_auth="none")
    )
    assert "Auth" not in public["Resources"]["PredictApi"]["Properties"]
    with pytest.raises(ValueError, match="iam or none"):
        sam_template("tiny", 1, LambdaOptions(pack=signed_pack, trust=keys[1], api_auth="open"))
