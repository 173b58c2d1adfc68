"""Kubernetes manifests and a BentoCloud deployment config for a containerized bento.

Written files: ``deployment.yaml``, ``service.yaml``, and either ``hpa.yaml`` (CPU, autoscaling/v2)
or, with KEDA, ``scaledobject.yaml`` (Prometheus request rate; KEDA owns the HPA it creates, so a
second HPA on the same Deployment would fight it), plus ``bentocloud.yaml`` with the same scaling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpack.errors import ConfigError

PORT = 3000
REQUEST_RATE_QUERY = 'sum(rate(edgebento_requests_total{{namespace="{ns}",app="{app}"}}[1m]))'


@dataclass(frozen=True)
class K8sOptions:
    bento: str  # a bento tag, NAME:VERSION
    model: str  # the EDGEBENTO_MODEL tag inside the bento
    image: str | None = None  # default: the tag `bentoml containerize` gives
    namespace: str = "default"
    min_replicas: int = 1
    max_replicas: int = 5
    cpu_target: int = 70  # percent of the CPU request
    cpu_request: str = "500m"
    cpu_limit: str = "2"
    memory_request: str = "512Mi"
    memory_limit: str = "2Gi"
    keda: bool = False
    prometheus_url: str = "http://prometheus-server.monitoring.svc:80"
    requests_per_replica: int = 200  # KEDA's target request rate per replica
    instance_type: str = "cpu.2"  # BentoCloud
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if ":" not in self.bento:
            raise ConfigError(f"--bento must be a bento tag NAME:VERSION, got {self.bento!r}")
        if self.min_replicas < 0:
            raise ConfigError("--min must be 0 (scale to zero) or more")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ConfigError("--max must be at least --min and at least 1")
        if not 1 <= self.cpu_target <= 100:
            raise ConfigError("--cpu-target is a percentage between 1 and 100")

    @property
    def app(self) -> str:
        """A DNS-1123 name made of the bento name and version."""
        raw = self.bento.replace(":", "-").lower()
        return re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:63].rstrip("-")

    @property
    def image_ref(self) -> str:
        return self.image or self.bento.lower()


def _probe(path: str, period: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "initialDelaySeconds": 3,
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }


def deployment(o: K8sOptions) -> dict[str, Any]:
    labels = {"app": o.app, "app.kubernetes.io/part-of": "edgebento"}
    env = [{"name": "EDGEBENTO_MODEL", "value": o.model}]
    env += [{"name": k, "value": v} for k, v in sorted(o.extra_env.items())]
    container = {
        "name": "bento",
        "image": o.image_ref,
        "args": ["bentoml", "serve", "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {
            "requests": {"cpu": o.cpu_request, "memory": o.memory_request},
            "limits": {"cpu": o.cpu_limit, "memory": o.memory_limit},
        },
        "livenessProbe": _probe("/livez", 10),
        "readinessProbe": _probe("/readyz", 5),
        "startupProbe": {**_probe("/livez", 2), "failureThreshold": 30},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": o.app, "namespace": o.namespace, "labels": labels},
        "spec": {
            "replicas": max(o.min_replicas, 1),
            "selector": {"matchLabels": {"app": o.app}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 30},
            },
        },
    }


def service(o: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": o.app, "namespace": o.namespace, "labels": {"app": o.app}},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": o.app},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def hpa(o: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": o.app, "namespace": o.namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": o.app},
            # A plain HPA cannot scale to zero; KEDA and BentoCloud can (they get the 0).
            "minReplicas": max(o.min_replicas, 1),
            "maxReplicas": o.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": o.cpu_target},
                    },
                }
            ],
        },
    }


def scaled_object(o: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": o.app, "namespace": o.namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": o.app},
            "minReplicaCount": o.min_replicas,
            "maxReplicaCount": o.max_replicas,
            "cooldownPeriod": 300,
            "pollingInterval": 15,
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": o.prometheus_url,
                        "query": REQUEST_RATE_QUERY.format(ns=o.namespace, app=o.app),
                        "threshold": str(o.requests_per_replica),
                        "activationThreshold": "1",
                    },
                },
                {
                    "type": "cpu",
                    "metricType": "Utilization",
                    "metadata": {"value": str(o.cpu_target)},
                },
            ],
        },
    }


def bentocloud(o: K8sOptions) -> dict[str, Any]:
    """``bentoml deployment create -f bentocloud.yaml``; min 0 is scale-to-zero there."""
    env = [{"name": "EDGEBENTO_MODEL", "value": o.model}]
    env += [{"name": k, "value": v} for k, v in sorted(o.extra_env.items())]
    return {
        "name": o.app,
        "bento": o.bento,
        "access_authorization": True,
        "envs": env,
        "services": {
            "edgebento": {
                "instance_type": o.instance_type,
                "scaling": {"min_replicas": o.min_replicas, "max_replicas": o.max_replicas},
            }
        },
    }


def manifests(o: K8sOptions) -> dict[str, dict[str, Any]]:
    """File name -> document."""
    docs = {"deployment.yaml": deployment(o), "service.yaml": service(o)}
    if o.keda:
        docs["scaledobject.yaml"] = scaled_object(o)
    else:
        docs["hpa.yaml"] = hpa(o)
    docs["bentocloud.yaml"] = bentocloud(o)
    return docs


def write_manifests(o: K8sOptions, out: Path) -> list[Path]:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in manifests(o).items():
        path = out / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(path)
    return written
