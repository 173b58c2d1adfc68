from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from bentos.deploy_k8s import K8sOptions, write_manifests
from edgebento.cli import main
from modelpack.errors import ConfigError

K8S_VERSION = "1.30"


def _load(out: Path) -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))}


def _validate_bentocloud(doc: dict) -> None:
    """Structure the config with BentoML's own deployment schema (what the CLI sends)."""
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    schema = bentoml_cattr.structure(doc, CreateDeploymentSchema)
    assert schema.bento == doc["bento"]


def test_the_cli_writes_valid_manifests_with_probes_resources_and_an_hpa(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    code = main(
        [
            "deploy",
            "k8s",
            "--bento",
            "edgebento:abc123",
            "--model",
            "tiny:v1",
            "--out",
            str(out),
            "--min",
            "2",
            "--max",
            "7",
            "--cpu-target",
            "60",
        ]
    )
    assert code == 0
    docs = _load(out)
    assert set(docs) == {"deployment.yaml", "service.yaml", "hpa.yaml", "bentocloud.yaml"}
    for name in ("deployment.yaml", "service.yaml", "hpa.yaml"):
        kubernetes_validate.validate(docs[name], K8S_VERSION, strict=True)
    container = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "EDGEBENTO_MODEL", "value": "tiny:v1"} in container["env"]
    assert container["resources"]["requests"]["cpu"]
    hpa = docs["hpa.yaml"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 7)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    assert hpa["spec"]["scaleTargetRef"]["name"] == docs["deployment.yaml"]["metadata"]["name"]
    cloud = docs["bentocloud.yaml"]
    assert cloud["services"]["edgebento"]["scaling"] == {"min_replicas": 2, "max_replicas": 7}
    _validate_bentocloud(cloud)


def test_keda_scales_to_zero_on_the_request_metric(tmp_path: Path) -> None:
    options = K8sOptions(
        bento="edgebento:abc", model="tiny:v1", min_replicas=0, max_replicas=4, keda=True
    )
    write_manifests(options, tmp_path)
    docs = _load(tmp_path)
    assert "hpa.yaml" not in docs  # KEDA makes its own HPA; two would fight over the Deployment
    kubernetes_validate.validate(docs["deployment.yaml"], K8S_VERSION, strict=True)
    scaled = docs["scaledobject.yaml"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 4)
    prometheus = scaled["spec"]["triggers"][0]
    assert prometheus["type"] == "prometheus"
    assert "edgebento_requests_total" in prometheus["metadata"]["query"]
    assert docs["bentocloud.yaml"]["services"]["edgebento"]["scaling"]["min_replicas"] == 0
    _validate_bentocloud(docs["bentocloud.yaml"])


def test_min_zero_without_keda_keeps_one_replica_in_the_hpa(tmp_path: Path) -> None:
    write_manifests(K8sOptions(bento="b:1", model="m:v1", min_replicas=0), tmp_path)
    docs = _load(tmp_path)
    kubernetes_validate.validate(docs["hpa.yaml"], K8S_VERSION, strict=True)
    assert docs["hpa.yaml"]["spec"]["minReplicas"] == 1
    assert docs["bentocloud.yaml"]["services"]["edgebento"]["scaling"]["min_replicas"] == 0


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"bento": "no-version"}, "NAME:VERSION"),
        ({"min_replicas": 3, "max_replicas": 2}, "--max"),
        ({"cpu_target": 0}, "percentage"),
        ({"min_replicas": -1}, "--min"),
    ],
)
def test_impossible_scaling_is_refused(kwargs: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        K8sOptions(**{"bento": "b:1", "model": "m:v1", **kwargs})
