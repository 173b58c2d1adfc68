from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bentos import lambda_handler
from modelpack import read_samples
from modelpack.errors import ConfigError, SignatureError


@pytest.fixture
def served(
    signed_pack: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    monkeypatch.setenv("EDGEBENTO_PACK", str(signed_pack))
    monkeypatch.setenv("EDGEBENTO_TRUST", str(keys[1]))
    monkeypatch.delenv("EDGEBENTO_PACK_URL", raising=False)
    lambda_handler.reset()
    yield signed_pack
    lambda_handler.reset()


def _request(pack: Path) -> tuple[dict, np.ndarray]:
    samples = read_samples(pack / "samples.npz")
    return {"inputs": {"x": samples.inputs["x"].tolist()}}, samples.outputs["probs"]


def _v1(body: str, b64: bool = False, method: str = "POST", path: str = "/predict") -> dict:
    return {
        "resource": path,
        "path": path,
        "httpMethod": method,
        "headers": {"content-type": "application/json"},
        "requestContext": {"resourcePath": path, "httpMethod": method, "stage": "prod"},
        "body": body,
        "isBase64Encoded": b64,
    }


def _v2(body: str, b64: bool = False, method: str = "POST", path: str = "/predict") -> dict:
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "headers": {"content-type": "application/json"},
        "requestContext": {
            "http": {"method": method, "path": path},
            "domainName": "x.lambda-url.us-east-1.on.aws",
        },
        "body": body,
        "isBase64Encoded": b64,
    }


def _alb(body: str, b64: bool = False, method: str = "POST", path: str = "/predict") -> dict:
    return {
        "requestContext": {
            "elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/t/1"}
        },
        "httpMethod": method,
        "path": path,
        "headers": {"content-type": "application/json"},
        "body": body,
        "isBase64Encoded": b64,
    }


def test_a_direct_invocation_returns_the_answer_json(served: Path) -> None:
    request, expected = _request(served)
    answer = lambda_handler.handler(request, None)
    assert answer["model"] == {"name": "tiny", "version": 1}
    np.testing.assert_allclose(answer["outputs"]["probs"], expected, rtol=1e-5)


def test_a_bad_direct_invocation_says_why_with_a_4xx(served: Path) -> None:
    answer = lambda_handler.handler({"inputs": {"x": [[1, 2]]}}, None)
    assert answer["statusCode"] == 400
    assert answer["reason"] == "shape"


@pytest.mark.parametrize("make", [_v1, _v2, _alb], ids=["rest-v1", "http-v2-and-url", "alb"])
@pytest.mark.parametrize("b64", [False, True], ids=["text", "base64"])
def test_http_events_get_status_headers_and_a_json_body(served: Path, make, b64: bool) -> None:
    request, expected = _request(served)
    body = json.dumps(request)
    if b64:
        body = base64.b64encode(body.encode()).decode()
    answer = lambda_handler.handler(make(body, b64), None)
    assert answer["statusCode"] == 200
    assert answer["headers"]["Content-Type"] == "application/json"
    np.testing.assert_allclose(json.loads(answer["body"])["outputs"]["probs"], expected, rtol=1e-5)
    if make is _alb:
        assert answer["statusDescription"] == "200 OK"


@pytest.mark.parametrize("make", [_v1, _v2, _alb], ids=["rest-v1", "http-v2-and-url", "alb"])
@pytest.mark.parametrize(
    ("body", "b64", "reason"),
    [
        ("{oops", False, "invalid_json"),
        ("", False, "empty_body"),
        ("not base64!!", True, "invalid"),
        ('{"inputs": {"x": [["a", "b", "c", "d", "e", "f", "g", "h"]]}}', False, "dtype"),
        ('{"inputs": {"z": [[1]]}}', False, "unknown_input"),
    ],
)
def test_bad_http_requests_are_4xx_with_the_reason(
    served: Path, make, body: str, b64: bool, reason: str
) -> None:
    answer = lambda_handler.handler(make(body, b64), None)
    assert answer["statusCode"] == 400
    assert json.loads(answer["body"])["reason"] == reason


def test_metadata_and_metrics_over_http(served: Path) -> None:
    lambda_handler.handler(_v2("{bad"), None)
    meta = lambda_handler.handler(_v2("", method="GET", path="/metadata"), None)
    assert json.loads(meta["body"])["model"] == {"name": "tiny", "version": 1}
    metrics = lambda_handler.handler(_v2("", method="GET", path="/metrics"), None)
    assert 'edgebento_input_rejected_total{reason="invalid_json"} 1.0' in metrics["body"]
    wrong = lambda_handler.handler(_v1("", method="DELETE"), None)
    assert wrong["statusCode"] == 405


def test_the_pack_is_loaded_once(served: Path) -> None:
    request, _ = _request(served)
    lambda_handler.handler(request, None)
    first = lambda_handler.get_endpoint()
    lambda_handler.handler(request, None)
    assert lambda_handler.get_endpoint() is first


def test_a_pack_signed_by_another_key_is_refused_at_cold_start(
    served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelpack import generate_keypair

    _, other = generate_keypair(tmp_path / "other")
    monkeypatch.setenv("EDGEBENTO_TRUST", str(other))
    with pytest.raises(SignatureError):
        lambda_handler.handler({"inputs": {}}, None)


def test_missing_configuration_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    lambda_handler.reset()
    monkeypatch.delenv("EDGEBENTO_PACK", raising=False)
    monkeypatch.delenv("EDGEBENTO_PACK_URL", raising=False)
    monkeypatch.setenv("EDGEBENTO_TRUST", "/nonexistent.pub")
    with pytest.raises(ConfigError, match="EDGEBENTO_PACK"):
        lambda_handler.handler({}, None)
    monkeypatch.delenv("EDGEBENTO_TRUST")
    with pytest.raises(ConfigError, match="EDGEBENTO_TRUST"):
        lambda_handler.handler({}, None)


def test_the_handler_module_does_not_import_bentoml() -> None:
    import subprocess
    import sys

    code = (
        "import sys, bentos.lambda_handler; print('bentoml' in sys.modules, 'boto3' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
