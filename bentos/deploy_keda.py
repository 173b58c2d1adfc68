"""KEDA objects for a bento's Deployment, with a way up from zero pods that exists at zero pods.

The pods' own request rate cannot wake a Deployment scaled to zero: with no pod, nothing reports
it. So ``--min 0`` takes one of two triggers that live outside the pods:

- KEDA's HTTP add-on (``--keda-http HOST``): requests go through its interceptor, which counts
  and holds them while it scales the Deployment up. Written: an ``HTTPScaledObject`` (the add-on
  creates the ScaledObject itself), a Service of type ExternalName in the app's namespace that
  names the interceptor, and an Ingress for HOST that sends traffic to it.
- a Prometheus query on a metric from upstream of the pods (``--activation-query``), such as an
  ingress controller's request counter, which grows even while every request gets a 503.

Without either, ``--min 0`` is refused with this reason.
"""

from __future__ import annotations

from typing import Any

from bentos.k8s_options import K8sOptions

# The pods' own figure, right while at least one pod runs (the metric contract's counter).
OWN_RATE_QUERY = 'sum(rate(edgebento_requests_total{{namespace="{ns}",app="{app}"}}[1m]))'
INTERCEPTOR = "keda-add-ons-http-interceptor-proxy"
INTERCEPTOR_PORT = 8080
COOLDOWN_SECONDS = 300


def _target(o: K8sOptions) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": o.app}


def scaled_object(o: K8sOptions) -> dict[str, Any]:
    """A ScaledObject on a Prometheus request rate, plus CPU once pods run."""
    query = o.activation_query or OWN_RATE_QUERY.format(ns=o.namespace, app=o.app)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": o.app, "namespace": o.namespace},
        "spec": {
            "scaleTargetRef": _target(o),
            "minReplicaCount": o.min_replicas,
            "maxReplicaCount": o.max_replicas,
            "cooldownPeriod": COOLDOWN_SECONDS,
            "pollingInterval": 15,
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": o.prometheus_url,
                        "query": query,
                        "threshold": str(o.requests_per_replica),
                        # Above 0 wakes the Deployment from zero: one request is enough.
                        "activationThreshold": "0",
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


def http_scaled_object(o: K8sOptions) -> dict[str, Any]:
    """The HTTP add-on's object: its interceptor routes HOST to the Service and scales on it."""
    assert o.keda_http_host is not None
    return {
        "apiVersion": "http.keda.sh/v1alpha1",
        "kind": "HTTPScaledObject",
        "metadata": {"name": o.app, "namespace": o.namespace},
        "spec": {
            "hosts": [o.keda_http_host],
            "scaleTargetRef": {**_target(o), "service": o.app, "port": 80},
            "replicas": {"min": o.min_replicas, "max": o.max_replicas},
            "scaledownPeriod": COOLDOWN_SECONDS,
            "scalingMetric": {
                "requestRate": {
                    "targetValue": o.requests_per_replica,
                    "window": "1m",
                    "granularity": "1s",
                }
            },
        },
    }


def interceptor_service(o: K8sOptions) -> dict[str, Any]:
    """An Ingress reaches only Services of its own namespace; this one names the interceptor's."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{o.app}-keda", "namespace": o.namespace},
        "spec": {
            "type": "ExternalName",
            "externalName": f"{INTERCEPTOR}.{o.keda_namespace}.svc.cluster.local",
            "ports": [{"name": "http", "port": INTERCEPTOR_PORT, "protocol": "TCP"}],
        },
    }


def ingress(o: K8sOptions) -> dict[str, Any]:
    assert o.keda_http_host is not None
    backend = {"service": {"name": f"{o.app}-keda", "port": {"number": INTERCEPTOR_PORT}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": o.app, "namespace": o.namespace},
        "spec": {
            "rules": [
                {
                    "host": o.keda_http_host,
                    "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]},
                }
            ]
        },
    }


def keda_manifests(o: K8sOptions) -> dict[str, dict[str, Any]]:
    """File name -> document, for the KEDA path ``o`` asks for."""
    if o.keda_http_host is None:
        return {"scaledobject.yaml": scaled_object(o)}
    return {
        "httpscaledobject.yaml": http_scaled_object(o),
        "interceptor-service.yaml": interceptor_service(o),
        "ingress.yaml": ingress(o),
    }
