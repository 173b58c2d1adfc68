"""What a bento's Kubernetes and BentoCloud files are written from (``edgebento deploy k8s``'s
options), checked as they are given: both the plain objects (``bentos.deploy_k8s``) and KEDA's
(``bentos.deploy_keda``) are built from one ``K8sOptions``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from modelpack.errors import ConfigError

# Namespaces are DNS-1123 labels; ``app`` makes a DNS-1035 one (a letter first) for Services.
_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HOST = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Room for the longest suffix a name gets ("-keda"), inside the 63 characters of a label.
_APP_MAX = 63 - len("-keda")


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
    keda_http_host: str | None = None  # scale from zero through KEDA's HTTP add-on
    keda_namespace: str = "keda"  # where the HTTP add-on's interceptor runs
    activation_query: str | None = None  # a Prometheus query that exists at zero pods
    tmp_size: str = "1Gi"  # the emptyDir at /tmp
    instance_type: str = "cpu.2"  # BentoCloud
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if ":" not in self.bento:
            raise ConfigError(f"--bento must be a bento tag NAME:VERSION, got {self.bento!r}")
        if not self.app:
            raise ConfigError(f"--bento {self.bento!r} has no letters or digits to name objects by")
        if len(self.namespace) > 63 or not _DNS_1123.fullmatch(self.namespace):
            raise ConfigError(
                f"--namespace {self.namespace!r} must be a DNS label: 1-63 of a-z 0-9 -,"
                " starting and ending with a letter or digit"
            )
        host = self.keda_http_host
        if host is not None and (len(host) > 253 or not _HOST.fullmatch(host)):
            raise ConfigError(f"--keda-http {host!r} must be a lower-case DNS host name")
        if self.min_replicas < 0:
            raise ConfigError("--min must be 0 (scale to zero) or more")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ConfigError("--max must be at least --min and at least 1")
        if not 1 <= self.cpu_target <= 100:
            raise ConfigError("--cpu-target is a percentage between 1 and 100")
        if (self.keda_http_host or self.activation_query) and not self.keda:
            raise ConfigError("--keda-http and --activation-query are KEDA triggers: add --keda")
        if self.keda_http_host and self.activation_query:
            raise ConfigError("give --keda-http or --activation-query, not both")
        if (
            self.keda
            and self.min_replicas == 0
            and not (self.keda_http_host or self.activation_query)
        ):
            raise ConfigError(
                "--min 0 with --keda needs a trigger that exists at zero pods: the pods' own"
                " request rate stops with the last pod, so nothing would scale it up again;"
                " pass --keda-http HOST (KEDA's HTTP add-on) or --activation-query PROMQL"
                " (a metric from upstream, such as the ingress controller's requests)"
            )

    @property
    def app(self) -> str:
        """A DNS-1035 name made of the bento name and version ("" when nothing is left)."""
        raw = self.bento.replace(":", "-").lower()
        name = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")
        if name and not name[0].isalpha():
            name = f"bento-{name}"  # a Service name starts with a letter
        return name[:_APP_MAX].rstrip("-")

    @property
    def image_ref(self) -> str:
        return self.image or self.bento.lower()
