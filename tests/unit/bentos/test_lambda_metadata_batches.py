"""Lambda's ``GET /metadata`` counts the model's runs as ``edgebento_batch_size`` does: one per
request that ran (tensor JSON or OIP, by direct invocation or through an HTTP event), with its
rows; a refused request runs nothing. It said 0 here before, counting only the Batcher's runs,
which Lambda (a threaded target: one request, one run) never makes."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bentos import lambda_handler
from modelpack import read_samples
from tests.unit.bentos.test_lambda_handler import _oip, _v2, served

__all__ = ["served"]  # the fixture, shared with the handler's own tests


def _batch_size() -> tuple[float, float]:
    """(count, sum) of the histogram, from a direct ``{"metrics": true}`` invocation."""
    text = lambda_handler.handler({"metrics": True}, None)["metrics"]
    found = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "edgebento_batch_size"
        for sample in family.samples
        if not sample.name.endswith("_bucket")
    }
    return found["edgebento_batch_size_count"], found["edgebento_batch_size_sum"]


def _batches() -> dict[str, int]:
    answer = lambda_handler.handler(_v2("", method="GET", path="/metadata"), None)
    assert answer["statusCode"] == 200, answer
    return dict(json.loads(answer["body"])["batches"])


def test_metadata_counts_each_run_and_its_rows_as_the_metric_does(served: Path) -> None:
    x = read_samples(served / "samples.npz").inputs["x"]
    assert len(x) >= 3
    assert _batches() == {"count": 0, "rows": 0} and _batch_size() == (0, 0)  # loading ran none
    runs = []
    assert "outputs" in lambda_handler.handler({"inputs": {"x": x[:1].tolist()}}, None)
    runs.append(1)
    body = json.dumps({"inputs": {"x": (x[:3] + 1).tolist()}})
    assert lambda_handler.handler(_v2(body), None)["statusCode"] == 200
    runs.append(3)
    oip = _v2(json.dumps(_oip(x[:2] + 2)), path="/v2/models/tiny/infer")
    assert lambda_handler.handler(oip, None)["statusCode"] == 200
    runs.append(2)
    refused = lambda_handler.handler(_v2(json.dumps({"inputs": {"x": [[1.0]]}})), None)
    assert refused["statusCode"] == 400  # refused before the model runs: no run
    assert _batches() == {"count": len(runs), "rows": sum(runs)}
    assert _batch_size() == (len(runs), sum(runs))
