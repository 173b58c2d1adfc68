from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bentos import lambda_handler
from modelpack import read_samples


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
    assert answer["headers"]["content-type"] == "application/json"
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


def test_metadata_over_http_and_metrics_only_to_a_direct_invocation(served: Path) -> None:
    lambda_handler.handler(_v2("{bad"), None)
    meta = lambda_handler.handler(_v2("", method="GET", path="/metadata"), None)
    assert json.loads(meta["body"])["model"] == {"name": "tiny", "version": 1}
    # The public API does not serve the metrics; a direct invocation (IAM) does.
    public = lambda_handler.handler(_v2("", method="GET", path="/metrics"), None)
    assert public["statusCode"] == 404
    text = lambda_handler.handler({"metrics": True}, None)["metrics"]
    assert 'edgebento_input_rejected_total{reason="invalid_json"} 1.0' in text
    wrong = lambda_handler.handler(_v1("", method="DELETE"), None)
    assert wrong["statusCode"] == 405


@pytest.mark.parametrize(
    "event",
    [
        {"version": "2.0", "requestContext": {"http": "POST"}, "body": "{}"},
        {"version": "2.0", "requestContext": {"http": None}},
        {"version": "2.0", "requestContext": {"http": {"method": 7}}},
        {"httpMethod": ["POST"], "requestContext": {}, "body": "{}"},
        {"httpMethod": "POST", "requestContext": {}, "body": {"inputs": {}}},
        {"httpMethod": "POST", "requestContext": {}, "headers": ["x"], "body": ""},
        {"requestContext": {"elb": {}}, "httpMethod": "POST", "path": 5},
    ],
)
def test_a_malformed_http_event_is_a_400_never_an_exception(served: Path, event: dict) -> None:
    answer = lambda_handler.handler(event, None)
    assert answer["statusCode"] == 400
    assert json.loads(answer["body"])["reason"] == "invalid"


def _oip(x: np.ndarray) -> dict:
    return {
        "id": "r1",
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}],
    }


@pytest.mark.parametrize("make", [_v1, _v2, _alb], ids=["rest-v1", "http-v2-and-url", "alb"])
def test_the_inference_protocol_over_http_events(served: Path, make) -> None:
    request, expected = _request(served)
    x = np.asarray(request["inputs"]["x"], np.float32)
    answer = lambda_handler.handler(make(json.dumps(_oip(x)), path="/v2/models/tiny/infer"), None)
    assert answer["statusCode"] == 200, answer
    doc = json.loads(answer["body"])
    assert doc["id"] == "r1" and doc["model_name"] == "tiny" and doc["model_version"] == "1"
    probs = next(o for o in doc["outputs"] if o["name"] == "probs")
    np.testing.assert_allclose(np.reshape(probs["data"], probs["shape"]), expected, rtol=1e-5)
    # The binary extension: the body base64-encoded by the front door, and so is the answer.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probs", "parameters": {"binary_data": True}}],
        }
    ).encode()
    event = make(
        base64.b64encode(header + x.tobytes()).decode(), True, path="/v2/models/tiny/infer"
    )
    event["headers"]["inference-header-content-length"] = str(len(header))
    answer = lambda_handler.handler(event, None)
    assert answer["statusCode"] == 200 and answer["isBase64Encoded"] is True
    raw = base64.b64decode(answer["body"])
    cut = int(answer["headers"]["inference-header-content-length"])
    out = json.loads(raw[:cut])["outputs"][0]
    got = np.frombuffer(raw[cut:], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    missing = lambda_handler.handler(make(json.dumps(_oip(x)), path="/v2/models/other/infer"), None)
    assert missing["statusCode"] == 404


def test_the_inference_protocol_by_direct_invocation(served: Path) -> None:
    request, expected = _request(served)
    answer = lambda_handler.handler(_oip(np.asarray(request["inputs"]["x"], np.float32)), None)
    probs = next(o for o in answer["outputs"] if o["name"] == "probs")
    np.testing.assert_allclose(np.reshape(probs["data"], probs["shape"]), expected, rtol=1e-5)


def test_the_pack_is_loaded_once(served: Path) -> None:
    request, _ = _request(served)
    lambda_handler.handler(request, None)
    first = lambda_handler.get_core().model
    lambda_handler.handler(request, None)
    assert lambda_handler.get_core().model is first


def test_a_pack_signed_by_another_key_is_a_503_with_the_reason(
    served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelpack import generate_keypair

    _, other = generate_keypair(tmp_path / "other")
    monkeypatch.setenv("EDGEBENTO_TRUST", str(other))
    answer = lambda_handler.handler({"inputs": {}}, None)
    assert answer["statusCode"] == 503 and answer["reason"] == "load_failed"
    assert "signature" in answer["error"] or "signed" in answer["error"]
    http = lambda_handler.handler(_v2("{}"), None)
    assert http["statusCode"] == 503 and "retry-after" in http["headers"]


def test_missing_configuration_is_a_503_that_names_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lambda_handler.reset()
    monkeypatch.delenv("EDGEBENTO_PACK", raising=False)
    monkeypatch.delenv("EDGEBENTO_PACK_URL", raising=False)
    monkeypatch.setenv("EDGEBENTO_TRUST", "/nonexistent.pub")
    answer = lambda_handler.handler({}, None)
    assert answer["statusCode"] == 503 and "EDGEBENTO_PACK" in answer["error"]
    lambda_handler.reset()
    monkeypatch.delenv("EDGEBENTO_TRUST")
    answer = lambda_handler.handler({}, None)
    assert answer["statusCode"] == 503 and "EDGEBENTO_TRUST" in answer["error"]
    lambda_handler.reset()


def test_the_handler_module_does_not_import_bentoml() -> None:
    import subprocess
    import sys

    code = (
        "import sys, bentos.lambda_handler; print('bentoml' in sys.modules, 'boto3' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- events in the shapes AWS generates them (the fields of the AWS documentation's and
# aws-lambda-powertools' sample events), not the minimal ones above -----------------------------


def _rest_v1(method: str, path: str, body: str | None, headers: dict | None) -> dict:
    """API Gateway REST API, Lambda proxy integration: both header maps, with the client's
    header case, nulls where nothing was sent."""
    multi = None if headers is None else {k: [v] for k, v in headers.items()}
    return {
        "version": "1.0",
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": multi,
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "id",
            "authorizer": {"claims": None, "scopes": None},
            "domainName": "id.execute-api.us-east-1.amazonaws.com",
            "httpMethod": method,
            "identity": {"sourceIp": "192.168.0.1/32", "userAgent": "agent", "user": None},
            "path": f"/prod{path}",
            "protocol": "HTTP/1.1",
            "requestId": "id=",
            "requestTimeEpoch": 1583349317135,
            "resourcePath": "/{proxy+}",
            "stage": "prod",
        },
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "body": body,
        "isBase64Encoded": False,
    }


def _http_v2(method: str, raw_path: str, body: str, b64: bool, headers: dict, stage: str) -> dict:
    """HTTP API payload 2.0 (a function URL sends the same, with stage "$default")."""
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": "",
        "cookies": ["cookie1", "cookie2"],
        "headers": {"user-agent": "agent", "x-forwarded-proto": "https", **headers},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "url-id",
            "domainName": "url-id.lambda-url.us-east-1.on.aws",
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": "123.123.123.123",
                "userAgent": "agent",
            },
            "requestId": "id",
            "routeKey": "$default",
            "stage": stage,
            "time": "05/Aug/2022:08:14:39 +0000",
            "timeEpoch": 1659687279885,
        },
        "body": body,
        "isBase64Encoded": b64,
    }


def _alb_multi(method: str, path: str, body: str, b64: bool, headers: dict) -> dict:
    """An ALB target group with multi-value headers on: no ``headers`` at all."""
    return {
        "requestContext": {
            "elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:eu-central-1:1:targetgroup/t/8"}
        },
        "httpMethod": method,
        "path": path,
        "multiValueQueryStringParameters": {},
        "multiValueHeaders": {
            "accept": ["*/*"],
            "x-forwarded-for": ["123.123.123.123"],
            **{k: [v] for k, v in headers.items()},
        },
        "body": body,
        "isBase64Encoded": b64,
    }


def _binary_oip(x: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "id": "bin",
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + x.tobytes(), len(header)


def _binary_answer(answer: dict, header_length: str) -> np.ndarray:
    """``probs`` from a binary OIP answer (its tensors follow the header in output order)."""
    raw = base64.b64decode(answer["body"])
    cut = int(header_length)
    start = cut
    for out in json.loads(raw[:cut])["outputs"]:
        size = out["parameters"]["binary_data_size"]
        if out["name"] == "probs":
            return np.frombuffer(raw[start : start + size], np.float32).reshape(out["shape"])
        start += size
    raise AssertionError("no probs in the answer")


def test_real_shaped_rest_http_url_and_alb_events(served: Path) -> None:
    request, expected = _request(served)
    x = np.asarray(request["inputs"]["x"], np.float32)
    body = json.dumps(request)
    rest = lambda_handler.handler(
        _rest_v1("POST", "/predict", body, {"Content-Type": "application/json"}), None
    )
    assert rest["statusCode"] == 200, rest
    np.testing.assert_allclose(json.loads(rest["body"])["outputs"]["probs"], expected, rtol=1e-5)
    assert rest["multiValueHeaders"]["content-type"] == ["application/json"]
    # A request with no headers at all: API Gateway sends null for both maps.
    meta = lambda_handler.handler(_rest_v1("GET", "/metadata", None, None), None)
    assert meta["statusCode"] == 200
    # HTTP API on a named stage: rawPath carries the stage.
    v2 = _http_v2(
        "POST", "/prod/predict", body, False, {"content-type": "application/json"}, "prod"
    )
    assert lambda_handler.handler(v2, None)["statusCode"] == 200
    # A function URL base64-encodes a binary body; the binary answer goes back the same way.
    raw, cut = _binary_oip(x)
    url = _http_v2(
        "POST",
        "/v2/models/tiny/infer",
        base64.b64encode(raw).decode(),
        True,
        {"content-type": "application/octet-stream", "inference-header-content-length": str(cut)},
        "$default",
    )
    answer = lambda_handler.handler(url, None)
    assert answer["statusCode"] == 200 and answer["isBase64Encoded"] is True
    length = answer["headers"]["inference-header-content-length"]
    np.testing.assert_allclose(_binary_answer(answer, length), expected, rtol=1e-5)
    # ALB with multi-value headers: the answer must carry multiValueHeaders (ALB ignores
    # headers then, and the client lost the content type and the binary split).
    alb = _alb_multi(
        "POST",
        "/v2/models/tiny/infer",
        base64.b64encode(raw).decode(),
        True,
        {"Inference-Header-Content-Length": str(cut)},
    )
    answer = lambda_handler.handler(alb, None)
    assert answer["statusCode"] == 200 and answer["statusDescription"] == "200 OK"
    assert "headers" not in answer
    (length,) = answer["multiValueHeaders"]["inference-header-content-length"]
    np.testing.assert_allclose(_binary_answer(answer, length), expected, rtol=1e-5)


def test_hostile_requests_in_real_shaped_events_are_4xx(served: Path) -> None:
    """A 5000-digit integer and a 5000-digit Inference-Header-Content-Length were 500s."""
    huge = '{"inputs": {"x": [[' + "1" * 5000 + "]]}}"
    json_headers = {"content-type": "application/json"}
    for event in (
        _rest_v1("POST", "/predict", huge, {"Content-Type": "application/json"}),
        _http_v2("POST", "/predict", huge, False, json_headers, "$default"),
        _alb_multi("POST", "/predict", huge, False, json_headers),
    ):
        answer = lambda_handler.handler(event, None)
        assert (
            answer["statusCode"] == 400 and json.loads(answer["body"])["reason"] == "invalid_json"
        )
    raw, _ = _binary_oip(np.zeros((1, 8), np.float32))
    for length in ("9" * 5000, "-1", str(len(raw) + 1), "x"):
        event = _http_v2(
            "POST",
            "/v2/models/tiny/infer",
            base64.b64encode(raw).decode(),
            True,
            {"inference-header-content-length": length},
            "$default",
        )
        assert lambda_handler.handler(event, None)["statusCode"] == 400
    head = lambda_handler.handler(_rest_v1("HEAD", "/predict", None, None), None)
    assert head["statusCode"] == 405
    direct = lambda_handler.handler({"inputs": {"x": [[10**30] * 8]}}, None)
    assert direct["statusCode"] == 400
