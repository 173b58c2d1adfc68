"""The Lambda handler under hostile events (issue 18): no exception leaves it for any event of
the four kinds (direct invocation, API Gateway REST v1, HTTP API v2 and function URLs, ALB),
also one whose body cannot be encoded; what it returns is something the runtime can write; a
huge timeout is the client's 400, not a counted error; floats are written by the one encoder."""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bentos import lambda_handler
from bentos.lambda_events import event_source
from tests.support import models

ROW = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, mlp_model: Path, keys: tuple[Path, Path]
) -> Iterator[None]:
    from modelpack import Samples, create_pack

    inputs, outputs = models.golden_samples(mlp_model)
    pack = tmp_path_factory.mktemp("lambda-hostile") / "pack"
    create_pack(
        mlp_model, pack, name="tiny", version=1, samples=Samples(inputs, outputs), key=keys[0]
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EDGEBENTO_PACK", str(pack))
        env.setenv("EDGEBENTO_TRUST", str(keys[1]))
        env.delenv("EDGEBENTO_PACK_URL", raising=False)
        lambda_handler.reset()
        yield
        lambda_handler.reset()


def _rest(body: Any, path: str = "/predict", **extra: Any) -> dict[str, Any]:
    return {
        "resource": path,
        "path": path,
        "httpMethod": "POST",
        "headers": {"content-type": "application/json"},
        "requestContext": {"resourcePath": path, "httpMethod": "POST", "stage": "prod"},
        "body": body,
        "isBase64Encoded": False,
        **extra,
    }


def _http(body: Any, path: str = "/predict", **extra: Any) -> dict[str, Any]:
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "headers": {"content-type": "application/json"},
        "requestContext": {
            "http": {"method": "POST", "path": path},
            "domainName": "x.lambda-url.us-east-1.on.aws",
        },
        "body": body,
        "isBase64Encoded": False,
        **extra,
    }


def _alb(body: Any, path: str = "/predict", **extra: Any) -> dict[str, Any]:
    return {
        "requestContext": {
            "elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/t/1"}
        },
        "httpMethod": "POST",
        "path": path,
        "headers": {"content-type": "application/json"},
        "body": body,
        "isBase64Encoded": False,
        **extra,
    }


KINDS = {"rest": _rest, "http": _http, "alb": _alb}


def _written(answer: Any) -> bytes:
    """What the runtime does with an answer: JSON, in UTF-8 (a lone surrogate cannot be)."""
    return json.dumps(answer, ensure_ascii=False).encode("utf-8")


def _counted_errors() -> float:
    registry = lambda_handler._registry
    value = registry.get_sample_value("edgebento_requests_total", {"outcome": "error"})
    return value or 0.0


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_lone_surrogate_in_a_body_is_a_400_not_an_exception(served: None, kind: str) -> None:
    """``body.encode()`` raised UnicodeEncodeError out of the handler."""
    for body in ('{"inputs": {"x": [[1]]}, "k": "\ud800"}', "\udfff", "a\udc80b"):
        answer = lambda_handler.handler(KINDS[kind](body), None)
        assert answer["statusCode"] == 400, answer
        assert json.loads(answer["body"])["reason"] == "invalid"
        _written(answer)


def test_a_direct_invocation_with_lone_surrogates_is_answered_and_writable(served: None) -> None:
    oip = {"id": "\ud800", "inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32"}]}
    for event in (
        {"inputs": {"\ud800": [ROW]}},
        {"inputs": [{"name": "x\udfff", "shape": [1, 8], "datatype": "FP32", "data": ROW}]},
        {**oip, "inputs": [{**oip["inputs"][0], "data": ROW}]},
        {"inputs": {"x": [ROW]}, "\udc00": "\ud800"},
        "\ud800",
    ):
        answer = lambda_handler.handler(event, None)
        _written(answer)
        if isinstance(event, dict) and set(event) == {"inputs", "\udc00"}:
            assert "outputs" in answer  # fields it does not read are left alone
        else:
            assert answer["statusCode"] == 400, (event, answer)


def _digits(number: str) -> int:
    mantissa = number.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa.rstrip("0")) if "." in number.split("e")[0] else len(mantissa)


def test_a_direct_invocation_writes_float32_with_the_one_encoder(served: None) -> None:
    """The runtime writes the answer with json.dumps: its float32 numbers were float64's 17
    digits (0.10000000149011612), while every other target writes 9."""
    rows = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    tensor = lambda_handler.handler({"inputs": {"x": rows.tolist()}}, None)
    oip = lambda_handler.handler(
        {"inputs": [{"name": "x", "shape": [4, 8], "datatype": "FP32", "data": rows.tolist()}]},
        None,
    )
    for outputs in (tensor["outputs"], oip["outputs"]):
        text = json.dumps(outputs)
        numbers = re.findall(r"-?\d[\d.]*(?:e[-+]?\d+)?", text)
        assert numbers and max(_digits(n) for n in numbers) <= 9, text[:300]
    http = lambda_handler.handler(_http(json.dumps({"inputs": {"x": rows.tolist()}})), None)
    probs_http = np.float32(json.loads(http["body"])["outputs"]["probs"])
    np.testing.assert_array_equal(np.float32(tensor["outputs"]["probs"]), probs_http)


HUGE_TIMEOUT = (
    b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": '
    + json.dumps(ROW).encode()
    + b'}], "parameters": {"timeout": 1'
    + b"0" * 400
    + b"}}"
)
OIP_PATH = "/v2/models/tiny/infer"


def test_a_huge_timeout_is_a_400_that_is_not_counted_as_an_error(served: None) -> None:
    """float() of 1 and 400 zeros raised OverflowError: a 500, counted in the error rate a
    rollout reads."""
    lambda_handler.handler({"inputs": {"x": [ROW]}}, None)  # loaded, metrics registered
    errors = _counted_errors()
    direct = lambda_handler.handler(json.loads(HUGE_TIMEOUT), None)
    assert direct["statusCode"] == 400 and direct["reason"] == "invalid"
    assert "timeout" in direct["error"]
    for make in KINDS.values():
        answer = lambda_handler.handler(make(HUGE_TIMEOUT.decode(), OIP_PATH), None)
        assert answer["statusCode"] == 400, answer
        assert json.loads(answer["body"])["reason"] == "invalid"
    assert _counted_errors() == errors
    text = lambda_handler.handler({"metrics": True}, None)["metrics"]
    assert 'edgebento_input_rejected_total{reason="invalid"}' in text


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_body_after_its_gzip_member_is_a_400(served: None, kind: str) -> None:
    one = gzip.compress(json.dumps({"inputs": {"x": [ROW]}}).encode())
    two = one + gzip.compress(json.dumps({"inputs": {"x": [[9] * 8]}}).encode())
    for body, status in ((one, 200), (two, 400), (one + b"garbage", 400)):
        event = KINDS[kind](base64.b64encode(body).decode(), isBase64Encoded=True)
        event["headers"]["content-encoding"] = "gzip"
        answer = lambda_handler.handler(event, None)
        assert answer["statusCode"] == status, answer


# --- hypothesis: malformed events of all four kinds -----------------------------------------

TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates included
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([10**400, -(10**400), 2**64 - 1, 2**63, -(2**63) - 1])
    | st.floats()
    | TEXT
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
NUMBERS = st.lists(
    st.one_of(
        st.floats(), st.integers(-(2**65), 2**65), st.sampled_from([1e39, 2**53 + 1, 2**64 - 1])
    ),
    min_size=0,
    max_size=10,
)


@st.composite
def _oip_doc(draw: st.DrawFn) -> dict[str, Any]:
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["x", "y", "\ud800"]) | TEXT),
        "shape": draw(
            st.lists(st.integers(-1, 2**64) | st.sampled_from([0, 1, 8]), max_size=4) | JSONISH
        ),
        "datatype": draw(st.sampled_from(["FP32", "FP64", "INT64", "BYTES"]) | JSONISH),
        "data": draw(NUMBERS | st.lists(NUMBERS, max_size=2) | JSONISH),
    }
    if draw(st.booleans()):
        tensor["parameters"] = draw(
            st.fixed_dictionaries({"binary_data_size": st.integers(-5, 2**70)}) | JSONISH
        )
    doc: dict[str, Any] = {"inputs": [tensor]}
    for key, values in (
        ("id", TEXT | JSONISH),
        ("parameters", st.fixed_dictionaries({"timeout": SCALARS, "priority": SCALARS})),
        ("outputs", st.lists(st.fixed_dictionaries({"name": TEXT}), max_size=3) | JSONISH),
    ):
        if draw(st.booleans()):
            doc[key] = draw(values)
    return doc


@st.composite
def _tensor_doc(draw: st.DrawFn) -> dict[str, Any]:
    value = draw(
        st.lists(NUMBERS, max_size=3)
        | st.fixed_dictionaries(
            {"dtype": st.sampled_from(["float32", "int8"]) | JSONISH, "shape": JSONISH, "b64": TEXT}
        )
        | JSONISH
    )
    return {"inputs": {draw(st.sampled_from(["x", "z"]) | TEXT): value}}


DOCS = _oip_doc() | _tensor_doc() | JSONISH


@st.composite
def _http_event(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    doc = draw(DOCS)
    # JSON as a client writes it, with raw characters (lone surrogates too) or escapes, or text
    text = draw(st.sampled_from([json.dumps(doc), json.dumps(doc, ensure_ascii=False)]) | TEXT)
    path = draw(st.sampled_from(["/predict", OIP_PATH, "/metadata", "/v2"]) | TEXT)
    event = KINDS[kind](text, path)
    if draw(st.booleans()):
        raw = (
            draw(st.binary(max_size=40))
            if draw(st.booleans())
            else gzip.compress(text.encode("utf-8", "surrogatepass"))
        )
        event["body"], event["isBase64Encoded"] = base64.b64encode(raw).decode(), True
    headers = draw(
        st.dictionaries(
            st.sampled_from(
                ["content-encoding", "inference-header-content-length", "x-timeout-ms", "Host"]
            )
            | TEXT,
            TEXT | st.sampled_from(["gzip", "deflate", "1" + "0" * 400, "-1", "nan"]),
            max_size=3,
        )
    )
    event["headers"].update(headers)
    for _ in range(draw(st.integers(0, 2))):  # break the event's own fields
        key = draw(st.sampled_from(sorted(event)))
        event[key] = draw(JSONISH)
    if draw(st.booleans()):
        event["multiValueHeaders"] = draw(
            st.dictionaries(TEXT, st.lists(TEXT | st.none(), max_size=2) | JSONISH, max_size=2)
        )
    return event


EVENTS = st.one_of(DOCS, *(_http_event(kind) for kind in KINDS))


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(EVENTS)
def test_no_exception_leaves_the_handler_for_any_event(served: None, event: Any) -> None:
    answer = lambda_handler.handler(event, None)
    _written(answer)
    if event_source(event) == "direct":  # an event whose HTTP shape broke is taken as direct
        if isinstance(answer, dict) and "statusCode" in answer:
            assert 400 <= answer["statusCode"] < 500, answer  # a malformed request: the client's
            assert answer["reason"] and answer["error"]
        return
    assert isinstance(answer["statusCode"], int)
    if answer["statusCode"] >= 400 and not answer["isBase64Encoded"]:
        assert json.loads(answer["body"])["reason"]
    assert answer["statusCode"] != 500, answer
