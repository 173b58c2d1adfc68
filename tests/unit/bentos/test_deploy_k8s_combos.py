"""Every combination of the scaling flags, and hostile names, through the CLI: valid objects,
names Kubernetes accepts, and pods the "restricted" Pod Security Standard admits."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest

from edgebento.cli import main
from tests.support.pod_security import violations
from tests.unit.bentos.test_deploy_k8s import _load, _pod, _validate

DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # what a Service name must be
SCALING = {
    "hpa": [],
    "hpa-min0": ["--min", "0"],
    "keda": ["--keda"],
    "keda-min0-query": ["--keda", "--min", "0", "--activation-query", "sum(up)"],
    "keda-min0-http": ["--keda", "--min", "0", "--keda-http", "api.example.com"],
    "keda-http": ["--keda", "--keda-http", "api.example.com"],
}
BENTOS = [
    "edgebento:abc123",
    "1model:v1",  # a Service name may not start with a digit
    f"{'x' * 70}:{'v' * 16}",  # a name past 63 characters, and app + "-keda" past it
    "Über.Modell_2:A.B",
]


def _names_are_valid(docs: dict[str, dict[str, Any]]) -> None:
    for file, doc in docs.items():
        name = doc["metadata"]["name"]
        rule = DNS_1035_LABEL if doc["kind"] == "Service" else DNS_1123_LABEL
        assert len(name) <= 63 and rule.fullmatch(name), (file, name)
        for value in doc["metadata"].get("labels", {}).values():
            assert len(value) <= 63, (file, value)


@pytest.mark.parametrize(
    ("scaling", "bento"), list(itertools.product(SCALING, BENTOS)), ids=lambda v: str(v)[:20]
)
def test_every_flag_combination_is_admitted(tmp_path: Path, scaling: str, bento: str) -> None:
    out = tmp_path / "out"
    args = ["deploy", "k8s", "--bento", bento, "--model", "m:v1", "--out", str(out)]
    assert main([*args, *SCALING[scaling]]) == 0
    docs = _load(out)
    _validate(docs)
    _names_are_valid(docs)
    assert violations(_pod(docs)) == []
    assert "replicas" not in docs["deployment.yaml"]["spec"]
    scalers = {d["kind"] for d in docs.values()} & {
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "HTTPScaledObject",
    }
    assert len(scalers) == 1, scalers  # one owner of the replica count, never two
    # Every reference names an object that is written.
    written = {(d["kind"], d["metadata"]["name"]) for d in docs.values()}
    for doc in docs.values():
        target = doc.get("spec", {}).get("scaleTargetRef")
        if target:
            assert ("Deployment", target["name"]) in written
            if "service" in target:
                assert ("Service", target["service"]) in written
    for rule in docs.get("ingress.yaml", {}).get("spec", {}).get("rules", []):
        for path in rule["http"]["paths"]:
            assert ("Service", path["backend"]["service"]["name"]) in written


@pytest.mark.parametrize("namespace", ["Prod", "a_b", "x" * 64, "-a"])
def test_a_namespace_kubernetes_would_refuse_is_one_error_line(
    tmp_path: Path, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["deploy", "k8s", "--bento", "b:1", "--model", "m:v1", "--out", str(tmp_path)]
    assert main([*args, f"--namespace={namespace}"]) != 0
    assert "namespace" in capsys.readouterr().err
    assert not (tmp_path / "k8s").exists()


@pytest.mark.parametrize("bento", [":", "-:-", "ü:ü"])
def test_a_bento_tag_with_no_usable_name_is_refused(
    tmp_path: Path, bento: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["deploy", "k8s", f"--bento={bento}", "--model", "m:v1", "--out", str(tmp_path)]
    assert main(args) != 0
    assert "error:" in capsys.readouterr().err
