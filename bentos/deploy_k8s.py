"""Kubernetes manifests and a BentoCloud deployment config for a containerized bento.

Written, under ``--out``: ``k8s/`` with ``deployment.yaml``, ``service.yaml`` and either
``hpa.yaml`` (CPU, autoscaling/v2) or, with KEDA, the objects of ``bentos.deploy_keda`` (KEDA owns
the HPA it creates, so a second HPA on the same Deployment would fight it); and
``bentocloud/bentocloud.yaml`` with the same scaling, apart, so ``kubectl apply -f k8s/`` reads
Kubernetes objects only.

The pods meet the "restricted" Pod Security Standard: non-root (BentoML's image user, uid 1034),
no privilege escalation, every capability dropped, seccomp RuntimeDefault, no service-account
token, and a read-only root filesystem. What BentoML writes at start (its Prometheus
multiprocess directory, falling back to a temporary one, and the servers' sockets) goes to an
emptyDir at /tmp. The Deployment has no ``replicas``: the autoscaler owns the count, and an apply
that set it would reset it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bentos.deploy_keda import keda_manifests
from bentos.k8s_options import K8sOptions

PORT = 3000
BENTO_UID = 1034  # the user `bentoml containerize` creates and runs as (BENTO_USER_UID)
TMP = "/tmp"
BENTOML_HOME = f"{TMP}/bentoml"
K8S_DIR = "k8s"
BENTOCLOUD_DIR = "bentocloud"


def _probe(path: str, period: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "initialDelaySeconds": 3,
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }


POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": BENTO_UID,
    "runAsGroup": BENTO_UID,
    "fsGroup": BENTO_UID,  # the emptyDir is writable by the bento's group
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _container(o: K8sOptions) -> dict[str, Any]:
    env = [
        {"name": "EDGEBENTO_MODEL", "value": o.model},
        {"name": "TMPDIR", "value": TMP},
        # BentoML creates bentos/, models/, envs/ and its Prometheus directory under its home
        # at every start; the image's home (/home/bentoml) is read-only, so it goes to /tmp.
        # The bento itself stays where the image has it (BENTO_PATH).
        {"name": "BENTOML_HOME", "value": BENTOML_HOME},
    ]
    env += [{"name": k, "value": v} for k, v in sorted(o.extra_env.items())]
    return {
        "name": "bento",
        "image": o.image_ref,
        "args": ["bentoml", "serve", "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {
            "requests": {"cpu": o.cpu_request, "memory": o.memory_request},
            "limits": {"cpu": o.cpu_limit, "memory": o.memory_limit},
        },
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "tmp", "mountPath": TMP}],
        "livenessProbe": _probe("/livez", 10),
        "readinessProbe": _probe("/readyz", 5),
        "startupProbe": {**_probe("/livez", 2), "failureThreshold": 30},
    }


def deployment(o: K8sOptions) -> dict[str, Any]:
    labels = {"app": o.app, "app.kubernetes.io/part-of": "edgebento"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": o.app, "namespace": o.namespace, "labels": labels},
        "spec": {
            # No replicas: the HPA or KEDA owns the count; one here would reset it on every apply.
            "selector": {"matchLabels": {"app": o.app}},
            "template": {
                "metadata": {
                    "labels": dict(labels),  # a copy: YAML would write an anchor and an alias
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": POD_SECURITY,
                    "containers": [_container(o)],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": o.tmp_size}}],
                    "terminationGracePeriodSeconds": 30,
                },
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
    """Path under ``--out`` -> document."""
    docs = {"deployment.yaml": deployment(o), "service.yaml": service(o)}
    docs |= keda_manifests(o) if o.keda else {"hpa.yaml": hpa(o)}
    return {f"{K8S_DIR}/{name}": doc for name, doc in docs.items()} | {
        f"{BENTOCLOUD_DIR}/bentocloud.yaml": bentocloud(o)
    }


def write_manifests(o: K8sOptions, out: Path) -> list[Path]:
    import yaml

    written = []
    for name, doc in manifests(o).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(path)
    return written
