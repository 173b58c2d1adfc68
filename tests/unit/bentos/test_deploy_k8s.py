from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bentos.deploy_k8s import K8sOptions, write_manifests
from edgebento.cli import main
from modelpack.errors import ConfigError
from tests.support.pod_security import violations

K8S_VERSION = "1.30"
BUILT_IN = {"Deployment", "Service", "HorizontalPodAutoscaler", "Ingress"}
INGRESS_QUERY = 'sum(rate(nginx_ingress_controller_requests{exported_service="edgebento-abc"}[1m]))'


def _load(out: Path) -> dict[str, dict[str, Any]]:
    """Every file ``kubectl apply -f out/k8s/`` would read (it reads the directory's files)."""
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((out / "k8s").iterdir())}


def _validate(docs: dict[str, dict[str, Any]]) -> None:
    for name, doc in docs.items():
        assert doc["apiVersion"] and doc["kind"], name  # a Kubernetes object, every one
        if doc["kind"] in BUILT_IN:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _validate_bentocloud(doc: dict) -> None:
    """Structure the config with BentoML's own deployment schema (what the CLI sends)."""
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    schema = bentoml_cattr.structure(doc, CreateDeploymentSchema)
    assert schema.bento == doc["bento"]


def _bentocloud(out: Path) -> dict[str, Any]:
    assert [p.name for p in (out / "bentocloud").iterdir()] == ["bentocloud.yaml"]
    doc = yaml.safe_load((out / "bentocloud" / "bentocloud.yaml").read_text())
    _validate_bentocloud(doc)
    return doc


def _pod(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return docs["deployment.yaml"]["spec"]["template"]["spec"]


def test_the_cli_writes_valid_manifests_with_probes_resources_and_an_hpa(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deploy"
    code = main(
        [
            *("deploy", "k8s", "--bento", "edgebento:abc123", "--model", "tiny:v1"),
            *("--out", str(out), "--min", "2", "--max", "7", "--cpu-target", "60"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"kubectl apply -f {out / 'k8s'}/" in printed
    # The image from the bento's tag, a command that works from any folder (issue 23 item 2).
    assert "(bentoml containerize edgebento:abc123; push it)" in printed
    docs = _load(out)
    assert set(docs) == {"deployment.yaml", "service.yaml", "hpa.yaml"}
    _validate(docs)
    container = _pod(docs)["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "EDGEBENTO_MODEL", "value": "tiny:v1"} in container["env"]
    assert container["resources"]["requests"]["cpu"]
    hpa = docs["hpa.yaml"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 7)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    assert hpa["spec"]["scaleTargetRef"]["name"] == docs["deployment.yaml"]["metadata"]["name"]
    # The autoscaler owns the count: a replicas field would reset it on every apply.
    assert "replicas" not in docs["deployment.yaml"]["spec"]
    cloud = _bentocloud(out)
    assert cloud["services"]["edgebento"]["scaling"] == {"min_replicas": 2, "max_replicas": 7}


@pytest.mark.parametrize("keda", [False, True], ids=["hpa", "keda"])
def test_the_pods_meet_the_restricted_pod_security_standard(tmp_path: Path, keda: bool) -> None:
    write_manifests(K8sOptions(bento="edgebento:abc", model="tiny:v1", keda=keda), tmp_path)
    docs = _load(tmp_path)
    _validate(docs)
    pod = _pod(docs)
    assert violations(pod) == []
    assert pod["automountServiceAccountToken"] is False
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 1034  # BentoML's user
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    # The one writable place: an emptyDir at /tmp, where TMPDIR points.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TMPDIR"] == "/tmp"
    # BentoML makes directories under its home at start: that home is in the emptyDir too.
    assert env["BENTOML_HOME"].startswith("/tmp/")
    assert "replicas" not in docs["deployment.yaml"]["spec"]


@pytest.mark.parametrize(
    "break_it",
    [
        lambda pod: pod["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
        lambda pod: pod["securityContext"].pop("seccompProfile"),
        lambda pod: pod["securityContext"].update(runAsNonRoot=False),
        lambda pod: pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        lambda pod: pod["containers"][0]["securityContext"].update(privileged=True),
    ],
    ids=["escalation", "capabilities", "seccomp", "root", "hostpath", "privileged"],
)
def test_the_checker_notices_a_pod_the_standard_refuses(tmp_path: Path, break_it: Any) -> None:
    """The control: each rule the manifests meet is one the checker enforces."""
    write_manifests(K8sOptions(bento="b:1", model="m:v1"), tmp_path)
    pod = copy.deepcopy(_pod(_load(tmp_path)))
    break_it(pod)
    assert violations(pod) != []


def test_keda_at_one_pod_and_up_scales_on_the_pods_request_rate(tmp_path: Path) -> None:
    options = K8sOptions(bento="edgebento:abc", model="tiny:v1", min_replicas=1, keda=True)
    write_manifests(options, tmp_path)
    docs = _load(tmp_path)
    assert set(docs) == {"deployment.yaml", "service.yaml", "scaledobject.yaml"}  # no second HPA
    _validate(docs)
    scaled = docs["scaledobject.yaml"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 5)
    assert scaled["spec"]["scaleTargetRef"]["name"] == docs["deployment.yaml"]["metadata"]["name"]
    prometheus = scaled["spec"]["triggers"][0]
    assert prometheus["type"] == "prometheus"
    assert "edgebento_requests_total" in prometheus["metadata"]["query"]


def test_keda_from_zero_on_a_query_that_exists_at_zero_pods(tmp_path: Path) -> None:
    options = K8sOptions(
        bento="edgebento:abc",
        model="tiny:v1",
        min_replicas=0,
        max_replicas=4,
        keda=True,
        activation_query=INGRESS_QUERY,
    )
    write_manifests(options, tmp_path)
    docs = _load(tmp_path)
    _validate(docs)
    spec = docs["scaledobject.yaml"]["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 4)
    trigger = spec["triggers"][0]["metadata"]
    assert trigger["query"] == INGRESS_QUERY  # counted by the ingress, not by the pods
    assert float(trigger["activationThreshold"]) == 0  # one request wakes it
    assert _bentocloud(tmp_path)["services"]["edgebento"]["scaling"]["min_replicas"] == 0


def test_keda_from_zero_through_the_http_add_on(tmp_path: Path) -> None:
    code = main(
        [
            *("deploy", "k8s", "--bento", "edgebento:abc", "--model", "tiny:v1"),
            *("--out", str(tmp_path), "--keda", "--min", "0", "--keda-http", "tiny.example.com"),
        ]
    )
    assert code == 0
    docs = _load(tmp_path)
    assert "scaledobject.yaml" not in docs  # the add-on makes its own ScaledObject
    _validate(docs)
    http = docs["httpscaledobject.yaml"]
    assert (http["apiVersion"], http["kind"]) == ("http.keda.sh/v1alpha1", "HTTPScaledObject")
    assert http["spec"]["replicas"] == {"min": 0, "max": 5}
    assert http["spec"]["hosts"] == ["tiny.example.com"]
    # The interceptor forwards to the app's own Service, on the port that Service serves.
    target, service = http["spec"]["scaleTargetRef"], docs["service.yaml"]
    assert target["name"] == docs["deployment.yaml"]["metadata"]["name"]
    assert target["service"] == service["metadata"]["name"]
    assert target["port"] in [p["port"] for p in service["spec"]["ports"]]
    # Traffic for the host reaches the interceptor (which holds it while a pod starts), not the
    # pods: the Ingress backend is the ExternalName Service that names the interceptor.
    rule = docs["ingress.yaml"]["spec"]["rules"][0]
    assert rule["host"] == "tiny.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    proxy = docs["interceptor-service.yaml"]
    assert backend["name"] == proxy["metadata"]["name"]
    assert proxy["spec"]["externalName"] == (
        "keda-add-ons-http-interceptor-proxy.keda.svc.cluster.local"
    )
    assert backend["port"]["number"] == proxy["spec"]["ports"][0]["port"] == 8080


def test_min_zero_with_keda_and_no_trigger_that_exists_at_zero_pods_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            *("deploy", "k8s", "--bento", "b:1", "--model", "m:v1", "--out", str(tmp_path)),
            *("--keda", "--min", "0"),
        ]
    )
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --min 0 with --keda needs a trigger that exists at zero pods")
    assert "--keda-http HOST" in line and "--activation-query PROMQL" in line
    assert not tmp_path.joinpath("k8s").exists()


def test_min_zero_without_keda_keeps_one_replica_in_the_hpa(tmp_path: Path) -> None:
    write_manifests(K8sOptions(bento="b:1", model="m:v1", min_replicas=0), tmp_path)
    docs = _load(tmp_path)
    _validate(docs)
    assert docs["hpa.yaml"]["spec"]["minReplicas"] == 1
    assert _bentocloud(tmp_path)["services"]["edgebento"]["scaling"]["min_replicas"] == 0


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"bento": "no-version"}, "NAME:VERSION"),
        ({"min_replicas": 3, "max_replicas": 2}, "--max"),
        ({"cpu_target": 0}, "percentage"),
        ({"min_replicas": -1}, "--min"),
        ({"keda_http_host": "h.example.com"}, "add --keda"),
        ({"keda": True, "keda_http_host": "h", "activation_query": "q"}, "not both"),
    ],
)
def test_impossible_scaling_is_refused(kwargs: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        K8sOptions(**{"bento": "b:1", "model": "m:v1", **kwargs})
